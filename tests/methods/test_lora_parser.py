"""The LoRA parser: scales and sites agree with PEFT; every key is accounted for; refusals name the cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import models
import pytest
from conftest import export
from safetensors.torch import load_file, save_file

from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.methods.loading import load_adapter


def _peft_scalings(model, adapter: Path) -> dict[str, float]:
    import copy

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
    return {
        name.removeprefix("base_model.model."): module.scaling["default"]
        for name, module in peft_model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["query", "value"], "use_rslora": True, "r": 4, "lora_alpha": 6},
        {
            "target_modules": ["query", "value", "dense"],
            "rank_pattern": {"layer.1.attention.self.query": 2, "dense": 3},
            "alpha_pattern": {"value": 3},
        },
        {"target_modules": r".*\.(query|key)", "layers_to_transform": None},
        {"target_modules": ["query", "value"], "layers_to_transform": [1], "layers_pattern": "layer"},
        {"target_modules": ["dense"], "exclude_modules": ["attention.output.dense"]},
    ],
    ids=["rslora", "patterns", "regex", "layers", "exclude"],
)
def test_sites_and_scales_match_peft(tmp_path, config):
    model = models.tiny_bert()
    adapter = models.make_lora(model, tmp_path / "a", **config)
    parsed = load_adapter(adapter, ir.module_table(export(model)))
    expected = _peft_scalings(model, adapter)
    assert {s.module: s.scalars["scale"] for s in parsed.sites} == pytest.approx(expected)
    assert all(s.op == "lora_linear" for s in parsed.sites)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_all_linear_resolves_like_peft(tmp_path, task_type):
    model = models.tiny_bert(head=True)
    adapter = models.make_lora(model, tmp_path / "a", target_modules="all-linear", task_type=task_type)
    resolved = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]  # PEFT's own list
    _edit_config(adapter, target_modules="all-linear")
    parsed = load_adapter(adapter, ir.module_table(export(model)))
    assert sorted(s.module for s in parsed.sites) == sorted(resolved)


def test_every_key_is_accounted_for(tmp_path):
    model = models.tiny_bert(head=True)
    adapter = models.make_lora(
        model,
        tmp_path / "a",
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        bias="all",
        lora_bias=True,
    )
    parsed = load_adapter(adapter, ir.module_table(export(model)))
    used = {t.key for s in parsed.sites for t in s.tensors.values() if t} | {r.tensor.key for r in parsed.replacements}
    unused = {k for k, _ in parsed.unused}
    keys = set(load_file(adapter / "adapter_model.safetensors"))
    assert used | unused == keys and not used & unused
    assert {r.param for r in parsed.replacements if r.reason == "modules_to_save"} == {
        "classifier.weight",
        "classifier.bias",
    }
    assert all(s.tensors["lora_B_bias"] is not None for s in parsed.sites)
    assert all("PEFT does not load it either" in why for _, why in parsed.unused)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def table(bert_table):
    return bert_table


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"use_dora": True}, InputError, "has no magnitude"),
        (
            {"init_lora_weights": "pissa_niter_4"},
            UnsupportedError,
            "modified base.*path_initial_model_for_weight_conversion",
        ),
        ({"init_lora_weights": "lora_ga"}, UnsupportedError, "modified base.*--base-residual"),
        ({"loftq_config": {"loftq_bits": 4}}, UnsupportedError, "with loftq_config.*modified base \\(loftq\\)"),
        ({"layer_replication": [[0, 1]]}, UnsupportedError, "layer_replication"),
        ({"brand_new_option": 3}, UnsupportedError, "brand_new_option=3"),
        ({"peft_type": "BONE"}, UnsupportedError, "peft_type 'BONE' is not supported"),
        ({"lora_bias": True}, InputError, "lora_bias=true but module"),
        ({"r": 2}, InputError, r"shape \[4, 32\] does not match the base model: expected \[r=2"),
        (
            {"target_modules": ["query", "value", "dense", "key"]},
            InputError,
            "key' is targeted by adapter_config.json.*has no tensors for it",
        ),
        ({"target_modules": ["query", "dense"]}, InputError, "value' is not targeted"),
        ({"bias": "some"}, InputError, "bias='some'"),
    ],
    ids=[
        "dora-without-magnitude",
        "pissa-niter",
        "lora-ga",
        "loftq",
        "replication",
        "unknown-field",
        "peft-type",
        "lora-bias",
        "rank",
        "missing-tensors",
        "untargeted",
        "bias",
    ],
)
def test_config_refusals(tmp_path, bert_adapter, table, changes, error, match):
    adapter = _edit_config(_copy(bert_adapter, tmp_path / "a"), **changes)
    with pytest.raises(error, match=match):
        load_adapter(adapter, table)


def test_train_only_fields_are_recorded_not_refused(tmp_path, bert_adapter, table):
    adapter = _edit_config(_copy(bert_adapter, tmp_path / "a"), lora_dropout=0.3, init_lora_weights="gaussian")
    parsed = load_adapter(adapter, table)
    assert "identity at inference" in parsed.ignored["lora_dropout"]
    assert parsed.honoured["init_lora_weights"] == "gaussian"  # read (it selects residual bases), no effect here


def test_fan_in_fan_out_mismatch_warns_like_peft(tmp_path, gpt2_adapter):
    adapter = _edit_config(_copy(gpt2_adapter, tmp_path / "a"), fan_in_fan_out=False)
    parsed = load_adapter(adapter, ir.module_table(export(models.tiny_gpt2())))
    assert all(s.scalars["fan_in_fan_out"] for s in parsed.sites)
    assert any("fan_in_fan_out=False" in w for w in parsed.warnings)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: t.update(
                {
                    "base_model.model.encoder.layer.0.attention.self.quarry.lora_A.weight": t.pop(
                        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
                    )
                }
            ),
            "quarry.*does not execute; did you mean 'encoder.layer.0.attention.self.query'",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": t[
                        "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
                    ][:, :3]
                }
            ),
            r"query.lora_B.weight: shape \[32, 3\] does not match",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": t[
                        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
                    ][:, :30]
                }
            ),
            r"query.lora_A.weight: shape \[4, 30\] does not match the base model: expected \[r=4, d_in=32\]",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.pooler.dense.weight_extra": t[
                        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
                    ].clone()
                }
            ),
            "pooler.dense.weight_extra: maps to no module or parameter",
        ),
        (
            lambda t: t.pop("base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"),
            "value' has no lora_B",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector": t[
                        "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
                    ][:, 0].clone()
                }
            ),
            "a DoRA magnitude, but adapter_config.json has use_dora=false",
        ),
    ],
    ids=["unknown-module", "rank-mismatch", "d_in-mismatch", "no-parameter", "missing-B", "stray-magnitude"],
)
def test_tensor_refusals_name_the_key(tmp_path, bert_adapter, table, edit, match):
    adapter = _copy(bert_adapter, tmp_path / "a")
    tensors = load_file(adapter / "adapter_model.safetensors")
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match=match):
        load_adapter(adapter, table)


def test_bare_safetensors_file_with_config(tmp_path, bert_adapter, table):
    weights = tmp_path / "weights.safetensors"
    shutil.copy(bert_adapter / "adapter_model.safetensors", weights)
    with pytest.raises(InputError, match="needs --config"):
        load_adapter(weights, table)
    parsed = load_adapter(weights, table, config=bert_adapter / "adapter_config.json")
    # query, value and the three dense layers of both blocks, plus the pooler
    assert parsed.name == "weights" and len(parsed.sites) == 2 * 5 + 1
