"""LoRA beyond Linear: Conv, Embedding, raw parameters (MoE experts), trainable tokens, and the
base-modifying initialisations; each compiled and checked against PEFT, each refusal naming its cause."""

from __future__ import annotations

import json

import models
import pytest
import torch
from conftest import assert_outputs_close, export
from safetensors.torch import load_file, save_file

import peftc
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders import parse_inputs
from peftc.methods.loading import load_adapter


def _lora(model, path, **config):
    from peft import LoraConfig

    return models.make_adapter(model, path, LoraConfig(r=4, lora_alpha=8, **config))


def _compile_and_compare(tmp_path, model, adapter, inputs, inputs_spec=(), merge=True, **options):
    artifact = peftc.compile(model, adapter, out=tmp_path / f"out-{merge}", merge=merge, inputs=inputs_spec, **options)
    manifest = artifact.manifest
    assert manifest.verification["passed"] and "peft" in {c["oracle"] for c in manifest.verification["cases"]}
    assert max(manifest.verification["adapter_effect"].values()) > 0.02
    assert_outputs_close(peftc.load(artifact.path)(**inputs), models.peft_outputs(model, adapter, inputs))
    return manifest


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_conv_lora_with_stride_and_padding(tmp_path, merge):
    model = models.convnet()
    adapter = _lora(model, tmp_path / "a", target_modules=["conv1", "conv2", "conv3"], use_rslora=True)
    x = {"x": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))}
    manifest = _compile_and_compare(tmp_path, model, adapter, x, models.CONVNET_INPUTS, merge)
    assert {s["op"] for s in manifest.adapters[0]["sites"]} == {"peftc::lora_weight"}


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_embedding_lora(tmp_path, merge):
    model = models.tiny_gpt2()
    adapter = _lora(model, tmp_path / "a", target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    _compile_and_compare(tmp_path, model, adapter, models.text_inputs(2, 11), merge=merge)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_target_parameters_on_moe_experts(tmp_path, merge):
    model = models.moe()
    adapter = _lora(model, tmp_path / "a", target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    x = {"x": torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(4))}
    manifest = _compile_and_compare(tmp_path, model, adapter, x, models.MOE_INPUTS, merge)
    assert {s["param"] for s in manifest.adapters[0]["sites"]} == {"gate_up_proj", "down_proj"}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_trainable_token_indices_follow_a_declared_tie(tmp_path, tie):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    adapter = _lora(model, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[2, 5, 9])
    manifest = _compile_and_compare(tmp_path, model, adapter, models.text_inputs(2, 9))
    token_sites = [s for s in manifest.adapters[0]["sites"] if s["op"] == "peftc::tokens_weight"]
    assert sorted(s["module"] for s in token_sites) == (
        ["lm_head", "model.embed_tokens"] if tie else ["model.embed_tokens"]
    )


def test_dora_magnitude_of_the_wrong_length_is_refused(tmp_path, bert_program):
    model = models.tiny_bert()
    adapter = _lora(model, tmp_path / "a", target_modules=["query"], use_dora=True)
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[key] = tensors[key][:30].contiguous()
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match=rf"{key}: DoRA magnitude has 30 elements \[30\], but module .* has 32 output"):
        load_adapter(adapter, ir.module_table(bert_program))


def test_unknown_unset_config_field_is_a_recorded_warning(tmp_path, bert_adapter):
    import shutil

    adapter = shutil.copytree(bert_adapter, tmp_path / "a")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "future_option": None}))
    manifest = peftc.compile(models.tiny_bert(), adapter, out=tmp_path / "out").manifest
    assert manifest.adapters[0]["config_ignored"]["future_option"].startswith("not known to peftc, but unset")
    assert any("'future_option'" in w for w in manifest.warnings)


# --- base-modifying initialisations ------------------------------------------------------------


def _pissa(model, path, init="pissa", convert=False):
    """A PEFT adapter initialised with ``init`` and then trained (perturbed), saved as PEFT saves it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=init)
    )
    initial = path.parent / f"{path.name}-initial"
    if convert:
        peft_model.save_pretrained(str(initial))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    kwargs = {"path_initial_model_for_weight_conversion": str(initial)} if convert else {}
    peft_model.save_pretrained(str(path), **kwargs)
    residual = peft_model.unload() if not convert else None  # the residual base PEFT trained on
    return path, residual


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_pissa_and_olora_rebuild_the_residual_base(tmp_path, init):
    model = models.tiny_bert()
    adapter, _ = _pissa(model, tmp_path / "a", init)
    manifest = _compile_and_compare(tmp_path, model, adapter, models.text_inputs(2, 8))
    residuals = [r for r in manifest.adapters[0]["replacements"] if "residual base" in r["reason"]]
    assert len(residuals) == 4  # query and value in both layers


def test_converted_pissa_is_plain_lora_on_the_original_base(tmp_path):
    model = models.tiny_bert()
    adapter, _ = _pissa(model, tmp_path / "a", convert=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # PEFT's conversion: rank 2r
    manifest = _compile_and_compare(tmp_path, model, adapter, models.text_inputs(2, 8))
    assert not manifest.adapters[0]["replacements"]


def test_base_residual_uses_the_given_base_as_is(tmp_path):
    model = models.tiny_bert()
    adapter, residual = _pissa(model, tmp_path / "a")
    artifact = peftc.compile(residual, adapter, out=tmp_path / "out", base_residual=True)
    assert artifact.manifest.verification["passed"] and not artifact.manifest.adapters[0]["replacements"]
    inputs = models.text_inputs(2, 8)
    assert_outputs_close(peftc.load(artifact.path)(**inputs), models.peft_outputs(model, adapter, inputs))


@pytest.mark.parametrize(
    ("init", "extra"),
    [("pissa_niter_4", {}), ("corda", {}), ("lora_ga", {}), (True, {"loftq_config": {"loftq_bits": 4}})],
    ids=["pissa-niter", "corda", "lora-ga", "loftq"],
)
def test_unrebuildable_initialisations_are_refused_with_how_to_convert(
    tmp_path, bert_adapter, bert_program, init, extra
):
    import shutil

    adapter = shutil.copytree(bert_adapter, tmp_path / "a")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init, **extra}))
    with pytest.raises(UnsupportedError, match="path_initial_model_for_weight_conversion.*--base-residual"):
        load_adapter(adapter, ir.module_table(bert_program))


def test_pissa_with_tied_singular_values_is_refused(tmp_path):
    model = models.Single(torch.nn.Linear(8, 8)).eval()
    with torch.no_grad():
        model.layer.weight.copy_(torch.eye(8))  # every singular value is 1
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=2, target_modules=["layer"], init_lora_weights="pissa")
    )
    peft_model.save_pretrained(str(tmp_path / "a"))
    table = ir.module_table(export(model, parse_inputs(["x:batch,8:float32"])))
    with pytest.raises(UnsupportedError, match="singular values 2 and 3 of the base weight are equal"):
        load_adapter(tmp_path / "a", table)
