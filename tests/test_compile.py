"""End to end: load → trace → adapt → merge/keep → ONNX → verify → write, checked against PEFT.

Each compile verifies itself (against peftc's eager reference and PEFT); the tests check the
artifact again with their own oracle (``models.peft_outputs``) through the public runtime API.
"""

from __future__ import annotations

import json

import models
import numpy as np
import pytest
import torch
from conftest import EXAMPLE_ADAPTER, assert_outputs_close, export

import peftc
from peftc import ir
from peftc.errors import InputError, VerificationError

# Every family unmerged (LoRA's ONNX translation on each layout), BERT merged too. The matrix
# (tests/test_matrix.py) checks merged and unmerged programs of every family against PEFT.
BERT = (models.tiny_bert, {"target_modules": ["query", "value", "dense"]}, 11)
LLAMA = (
    models.tiny_llama,
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    14,
)
GPT2 = (models.tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}, 8)
FAMILIES = [
    pytest.param(*BERT, True, id="bert-merged"),
    pytest.param(*BERT, False, id="bert-unmerged"),
    pytest.param(*LLAMA, False, id="llama-gqa-unmerged"),
    pytest.param(*GPT2, False, id="gpt2-conv1d-unmerged"),
]


def _check_against_peft(model, adapter, out, shapes=((2, 16), (1, 7))):
    runner = peftc.load(out)
    for shape in shapes:
        inputs = models.text_inputs(*shape)
        got = runner(**inputs)
        assert all(isinstance(v, torch.Tensor) for v in got.values())
        assert_outputs_close(got, models.peft_outputs(model, adapter, inputs))


@pytest.mark.parametrize(("build", "config", "sites", "merge"), FAMILIES)
def test_family_compiles_and_matches_peft(tmp_path, build, config, sites, merge):
    model = build()
    adapter = models.make_lora(model, tmp_path / "adapter", **config)
    artifact = peftc.compile(model, adapter, out=tmp_path / "out", merge=merge)
    manifest = artifact.manifest
    assert manifest.status == "ok" and manifest.verification["passed"]
    assert {c["oracle"] for c in manifest.verification["cases"]} == {"reference", "peft"}
    assert len({json.dumps(c["sizes"]) for c in manifest.verification["cases"]}) == 3
    assert min(manifest.verification["adapter_effect"].values()) > 0.02  # the adapter really matters
    merge_record = [p for p in manifest.pipeline if p["name"] == "merge"]
    assert (merge_record[0]["stats"]["merged"] == sites) if merge else not merge_record
    assert len(manifest.target["adapter_initializers"]) == (0 if merge else 2 * sites)
    _check_against_peft(model, adapter, artifact.path)


@pytest.mark.parametrize(
    ("head", "config"),
    [
        (False, {"target_modules": r".*\.(query|value)", "use_rslora": True, "r": 6, "lora_alpha": 4}),
        (
            False,
            {
                "target_modules": ["query", "value", "dense"],
                "rank_pattern": {"dense": 2},
                "alpha_pattern": {"layer.1.attention.self.query": 16},
                "layers_to_transform": [1],
                "layers_pattern": "layer",
            },
        ),
        (
            True,
            {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "bias": "all", "lora_bias": True},
        ),
    ],
    ids=["rslora-regex", "patterns-layers", "modules_to_save-bias"],
)
def test_config_features_match_peft(tmp_path, head, config):
    model = models.tiny_bert(head=head)
    adapter = models.make_lora(model, tmp_path / "adapter", **config)
    artifact = peftc.compile(model, adapter, out=tmp_path / "out")
    assert artifact.manifest.verification["passed"]
    honoured = artifact.manifest.adapters[0]["config_honoured"]
    normal = lambda v: sorted(v) if isinstance(v, list) else v  # noqa: E731  (PEFT saves lists as sets)
    assert {k: normal(honoured[k]) for k in config} == {k: normal(v) for k, v in config.items()}
    _check_against_peft(model, adapter, artifact.path)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_real_minilm_with_bundled_adapter(minilm_artifacts, merge):
    model = models.real_minilm()
    artifact = minilm_artifacts[merge]
    manifest = peftc.load(artifact).manifest
    assert manifest.model["kind"] == "factory" and manifest.model["parameters"] == 22_713_216
    worst = max(o["max_rel"] for c in manifest.verification["cases"] for o in c["outputs"])
    assert worst <= 1e-5
    assert manifest.verification["adapter_effect"]["last_hidden_state"] > 0.01
    runner = peftc.load(artifact)
    for batch, seq in [(2, 24), (1, 128)]:
        inputs = models.text_inputs(batch, seq, vocab=30522)
        assert_outputs_close(runner(**inputs), models.peft_outputs(model, EXAMPLE_ADAPTER, inputs))


def test_vision_model_inputs_are_derived(tmp_path):
    model = models.tiny_vit()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "attention" in n]
    targets = sorted({n.rsplit(".", 1)[-1] for n in names if n.endswith("_proj") or n.endswith(("query", "value"))})
    adapter = models.make_lora(model, tmp_path / "adapter", target_modules=targets)
    artifact = peftc.compile(model, adapter, out=tmp_path / "out")
    # ViT interpolates its position embeddings: multiples of its patch from two patches to 4x its own size
    assert artifact.manifest.target["inputs"] == [
        {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}
    ]
    dims = artifact.manifest.target["signature"]["dims"]
    assert [(dims[d]["min"], dims[d]["max"], dims[d]["multiple"]) for d in ("height", "width")] == [(16, 128, 8)] * 2
    assert not hasattr(model.forward, "__self__") or model.forward.__func__ is type(model).forward  # not patched
    runner = peftc.load(artifact.path)
    for batch, height, width in ((1, 32, 32), (4, 48, 40), (1, 128, 16)):  # its own size takes HF's shortcut
        pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
        expected = models.peft_outputs(model, adapter, {"pixel_values": pixels, "interpolate_pos_encoding": True})
        assert_outputs_close(runner(pixel_values=pixels), expected)
    with pytest.raises(InputError, match=r"dim 2 \(height\) is 8, below its minimum 16"):
        runner(pixel_values=np.zeros((1, 3, 8, 32), np.float32))


def test_plain_module_from_a_factory_file(tmp_path):
    adapter = models.make_lora(models.mlp(), tmp_path / "adapter", target_modules=["lin0", "lin1"])
    spec = f"{models.__file__}:mlp"
    artifact = peftc.compile(spec, adapter, out=tmp_path / "out", inputs=models.MLP_INPUTS)
    assert artifact.manifest.model["kind"] == "factory"
    runner = peftc.load(artifact.path)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    got = runner(x=x)
    assert isinstance(got["output"], np.ndarray)
    expected = models.peft_outputs(models.mlp(), adapter, {"x": torch.from_numpy(x)})
    assert_outputs_close(got, expected)


def test_huggingface_directory_with_task_head(tmp_path):
    model = models.tiny_bert(head=True)
    model.save_pretrained(str(tmp_path / "base"))
    adapter = models.make_lora(model, tmp_path / "adapter", target_modules=["query", "value"])
    artifact = peftc.compile(str(tmp_path / "base"), adapter, out=tmp_path / "out")
    manifest = artifact.manifest
    assert manifest.model["kind"] == "huggingface" and manifest.model["class"] == "BertForSequenceClassification"
    assert set(manifest.model["files"]) == {"config.json", "model.safetensors"}
    assert [o["name"] for o in manifest.target["outputs"]] == ["logits"]
    _check_against_peft(model, adapter, artifact.path)


def test_exported_program_base(tmp_path, bert_adapter):
    program = export(models.tiny_bert())
    ir.save_program(program, tmp_path / "bert.pt2")
    artifact = peftc.compile(str(tmp_path / "bert.pt2"), bert_adapter, out=tmp_path / "out")
    assert artifact.manifest.model["kind"] == "exported"
    assert [n["what"] for n in artifact.manifest.not_run] == ["peft oracle"]
    assert {c["oracle"] for c in artifact.manifest.verification["cases"]} == {"reference"}
    _check_against_peft(models.tiny_bert(), bert_adapter, artifact.path)


def test_caller_objects_are_left_unchanged(tmp_path, bert_adapter):
    model = models.tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    peftc.compile(model, bert_adapter, out=tmp_path / "a")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    program = export(models.tiny_bert())
    before = ir.fingerprint(program)
    peftc.compile(program, bert_adapter, out=tmp_path / "b")
    assert ir.fingerprint(program) == before


def _drop_scale(monkeypatch):
    import peftc.methods.lora.ops as lora

    real = lora.delta_weight
    monkeypatch.setattr(lora, "delta_weight", lambda a, b, scale, layout: real(a, b, 1.0, layout))


def test_mutation_dropped_merge_scale_fails_verification(tmp_path, bert_adapter, monkeypatch):
    _drop_scale(monkeypatch)
    with pytest.raises(VerificationError, match="verification failed: output .* vs reference"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_mutation_wrong_onnx_translation_fails_verification(tmp_path, bert_adapter, monkeypatch):
    import peftc.methods.lora.onnx as translations

    real = translations.lora_linear
    monkeypatch.setattr(
        translations, "lora_linear", lambda x, w, b, a, bb, lb, scale, ffo: real(x, w, b, a, bb, lb, -scale, ffo)
    )
    with pytest.raises(VerificationError):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", merge=False)


def test_keep_failed_writes_a_failed_artifact_that_will_not_load(tmp_path, bert_adapter, monkeypatch):
    _drop_scale(monkeypatch)
    with pytest.raises(VerificationError):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", keep_failed=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and not manifest["verification"]["passed"]
    with pytest.raises(InputError, match="failed verification"):
        peftc.load(tmp_path / "out")


def test_load_rejects_a_modified_artifact(minilm_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(minilm_artifacts[True], copy)
    with (copy / "model.onnx").open("r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x00" * 16)
    with pytest.raises(InputError, match="sha256 differs from the manifest"):
        peftc.load(copy)


def test_runner_names_missing_inputs(minilm_artifacts):
    runner = peftc.load(minilm_artifacts[True])
    with pytest.raises(InputError, match=r"missing \['attention_mask'\]"):
        runner(input_ids=np.zeros((1, 4), dtype=np.int64))
