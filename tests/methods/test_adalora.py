"""AdaLoRA: the op equals PEFT's merge on every layer type (pruned ranks, ranknum = init_r, α ≤ 0);
rank_pattern refusals name the key; using the kept rank as ranknum is caught by verification."""

from __future__ import annotations

import copy
import json

import models
import pytest
import torch
from conftest import export

import peftc
from peftc import ir
from peftc.errors import InputError, VerificationError
from peftc.loaders import parse_inputs
from peftc.methods.adalora import adalora_weight
from peftc.methods.loading import load_adapter

LAYERS = {
    "linear": (lambda: torch.nn.Linear(12, 9), "x:batch,12:float32"),
    "conv1d": (lambda: __import__("transformers").pytorch_utils.Conv1D(9, 12), "x:batch,12:float32"),
    "conv": (lambda: torch.nn.Conv2d(4, 6, 3, padding=1), "x:batch,4,8,8:float32"),
}


def _adalora(model, path, noise=1.0, **config):
    from peft import AdaLoraConfig

    config = {"init_r": 6, "target_r": 3, "total_step": 10, "lora_alpha": 8, **config}
    return models.make_adapter(model, path, AdaLoraConfig(**config), noise=noise)


@pytest.mark.parametrize("alpha", [8, 0], ids=["alpha", "alpha-0"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_merged_weight_equals_peft(tmp_path, kind, alpha):
    from peft import PeftModel

    build, signature = LAYERS[kind]
    torch.manual_seed(0)
    model = models.Single(build()).eval()
    adapter = _adalora(
        model, tmp_path / "a", target_modules=["layer"], lora_alpha=alpha, fan_in_fan_out=kind == "conv1d"
    )
    mask = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]["layer.lora_E"]
    assert 0 < sum(mask) < 6  # a pruned rank, not the initial one
    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload().layer.weight
    (site,) = load_adapter(adapter, ir.module_table(export(model, parse_inputs([signature])))).sites
    assert site.info["r"] == sum(mask) and site.scalars["ranknum"] == 6
    t = {role: entry.tensor for role, entry in site.tensors.items()}
    ours = adalora_weight(model.layer.weight, t["lora_A"], t["lora_B"], t["lora_E"], **site.scalars)
    torch.testing.assert_close(ours, merged.detach(), rtol=1e-6, atol=1e-7)
    assert (ours - model.layer.weight).abs().max() > 1e-2 * model.layer.weight.abs().max()


def test_module_pruned_to_rank_zero(tmp_path):
    model = models.tiny_bert()
    adapter = _adalora(model, tmp_path / "a", target_modules=["query", "value"])
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    key = "encoder.layer.0.attention.self.query.lora_E"
    kept = config["rank_pattern"][key]
    config["rank_pattern"][key] = [False] * len(kept)
    path.write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.encoder.layer.0.attention.self.query"
    tensors[f"{prefix}.lora_A"] = tensors[f"{prefix}.lora_A"][:0]
    tensors[f"{prefix}.lora_E"] = tensors[f"{prefix}.lora_E"][:0]
    tensors[f"{prefix}.lora_B"] = tensors[f"{prefix}.lora_B"][:, :0]
    save_file({k: v.contiguous() for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
    artifact = peftc.compile(model, adapter, out=tmp_path / "out")
    assert artifact.manifest.verification["passed"]
    assert {c["oracle"] for c in artifact.manifest.verification["cases"]} == {"reference", "peft"}


@pytest.fixture
def adalora_adapter(tmp_path):
    model = models.tiny_bert()
    return model, _adalora(model, tmp_path / "a", target_modules=["query", "value"])


def _edit_pattern(adapter, change):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config["rank_pattern"])
    path.write_text(json.dumps(config))


def test_refuses_rank_pattern_for_a_module_that_does_not_exist(adalora_adapter, bert_program):
    _, adapter = adalora_adapter
    _edit_pattern(adapter, lambda p: p.update({"encoder.layer.7.attention.self.query.lora_E": [True] * 6}))
    with pytest.raises(
        InputError, match=r"rank_pattern names 'encoder.layer.7.attention.self.query.lora_E', but the adapter has no"
    ):
        load_adapter(adapter, ir.module_table(bert_program))


def test_refuses_a_mask_that_disagrees_with_the_saved_rank(adalora_adapter, bert_program):
    _, adapter = adalora_adapter
    key = "encoder.layer.1.attention.self.value.lora_E"
    _edit_pattern(adapter, lambda p: p.update({key: [True] * 6}))
    with pytest.raises(
        InputError, match=r"value.lora_A: shape \[\d, 32\] does not match the base model: expected \[r=6"
    ):
        load_adapter(adapter, ir.module_table(bert_program))


def test_refuses_a_mask_of_the_wrong_length(adalora_adapter, bert_program):
    _, adapter = adalora_adapter
    _edit_pattern(adapter, lambda p: p.update({"encoder.layer.1.attention.self.value.lora_E": [True] * 4}))
    with pytest.raises(
        InputError, match=r"rank_pattern\['encoder.layer.1.attention.self.value.lora_E'\] is not a list of init_r=6"
    ):
        load_adapter(adapter, ir.module_table(bert_program))


def test_mutation_kept_rank_as_ranknum_fails_verification(adalora_adapter, tmp_path, monkeypatch):
    import peftc.methods.adalora as parser

    model, adapter = adalora_adapter
    real = parser.Site

    def kept_rank(module, op, tensors, scalars, info, param):
        return real(module, op, tensors, {**scalars, "ranknum": float(info["r"])}, info, param)

    monkeypatch.setattr(parser, "Site", kept_rank)
    with pytest.raises(VerificationError, match="vs peft"):
        peftc.compile(model, adapter, out=tmp_path / "out")
