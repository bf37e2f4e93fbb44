"""Task vectors against PEFT's own merge, and ``cat``/``svd`` against PEFT's ``add_weighted_adapter``
where PEFT is exact; where PEFT is wrong (one adapter, weight 1, rsLoRA or DoRA) peftc reproduces
the adapter exactly and the test records PEFT's error."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from combine_fixtures import VARIANTS, make_pair_fixture  # noqa: F401  (the make_pair fixture)

from peftc.combine.options import CombineOptions
from peftc.combine.run import task_vectors, write


def peft_deltas(model, adapter, name=None, extra=None) -> dict[str, torch.Tensor]:
    """ΔW = PEFT's merged weights − base, for every tensor PEFT's merge changes (the oracle)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
        if extra is not None:
            peft_model = extra(peft_model)
        merged = peft_model.merge_and_unload(**({"adapter_names": [name]} if name else {})).state_dict()
    base = model.state_dict()
    return {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}


def assert_deltas_equal(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        # fp32, W' − W computed two ways: rounding of W + ΔW bounds the difference by ~ε·|W|.
        torch.testing.assert_close(actual[key], value, rtol=0, atol=rel * max(1.0, float(value.abs().max())))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_task_vectors_match_peft_merge(make_pair, model_name, variant):
    model, (a, b) = make_pair(model_name, variant)
    tv = task_vectors(model, [a, b])
    for index, path in enumerate((a, b)):
        expected = peft_deltas(model, path)
        actual = {k: tv.delta(index, k) for k in tv.keys if tv.delta(index, k).any()}
        assert_deltas_equal(actual, expected)
    # union with zeros: b targets modules a does not
    assert len(tv.keys) > len(tv.changes[0])
    missing = next(k for k in tv.keys if k not in tv.changes[0])
    assert not tv.delta(0, missing).any()


def _read_back(model, directory) -> dict[str, torch.Tensor]:
    tv = task_vectors(model, [directory])
    return {k: tv.delta(0, k) for k in tv.keys if tv.delta(0, k).any()}


def _combined(model, adapters, options, tmp_path):
    tv = task_vectors(model, adapters)
    out = tmp_path / "out"
    out.mkdir(parents=True)
    report = write(tv, options.checked_for(len(adapters)), out, str(out))
    return report, out


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_cat_and_full_rank_svd_match_peft_add_weighted_adapter(make_pair, tmp_path, method):
    model, (a, b) = make_pair("bert", "lora")
    weights = [0.7, -1.3]
    options = CombineOptions(method, weights=tuple(weights), rank=8)
    report, out = _combined(model, [a, b], options, tmp_path)
    assert report.format == "lora"
    if method == "svd":
        assert max(r.error for r in report.rows if r.error is not None) < 1e-5

    def add(peft_model):
        peft_model.load_adapter(str(b), adapter_name="b")
        kwargs = {"svd_rank": 8} if method == "svd" else {}
        peft_model.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=method, **kwargs)
        return peft_model

    expected = peft_deltas(model, a, "mix", add)
    assert_deltas_equal(_read_back(model, out), expected, rel=1e-5)


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_single_adapter_weight_one_is_the_adapter_where_peft_is_not(make_pair, tmp_path, variant):
    """peft#3761: PEFT's add_weighted_adapter([a], [1.0]) is not ``a`` for rsLoRA (scaled √r twice) and
    DoRA (magnitude dropped); peftc's task arithmetic and cat reproduce it."""
    model, (a, _) = make_pair("bert", variant)
    expected = peft_deltas(model, a)
    for method in ("task-arithmetic", "cat"):
        _, out = _combined(model, [a], CombineOptions(method), tmp_path / method)
        assert_deltas_equal(_read_back(model, out), expected)

    def add(peft_model):
        peft_model.add_weighted_adapter(["default"], [1.0], "mix", combination_type="cat")
        return peft_model

    peft_result = peft_deltas(model, a, "mix", add)
    key = sorted(expected)[0]
    error = float((peft_result[key] - expected[key]).norm() / expected[key].norm())
    assert error > 0.1, f"PEFT reproduces the {variant} adapter now (error {error}); update the README note"


def test_cat_keeps_conv1d_layout_and_lora_bias(tmp_path):
    """GPT-2's Conv1D (``fan_in_fan_out``) and ``lora_bias``: the LoRA written reads back as Σ w_i ΔW_i."""
    import models

    model = models.tiny_gpt2()
    kwargs = {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "lora_bias": True}
    adapters = [models.make_lora(model, tmp_path / f"g{i}", seed=i, **kwargs) for i in range(2)]
    report, out = _combined(model, adapters, CombineOptions("cat", weights=(1.0, -0.5)), tmp_path / "cat")
    assert report.format == "lora" and any(k.endswith(".bias") for k in _read_back(model, out))
    first, second = (peft_deltas(model, a) for a in adapters)
    expected = {k: first[k] - 0.5 * second[k] for k in first}
    assert_deltas_equal(_read_back(model, out), expected)


def test_an_activation_transform_has_no_delta_and_is_refused(make_pair):
    import dataclasses

    from peftc.combine.deltas import TaskVectors
    from peftc.errors import UnsupportedError
    from peftc.methods.base import Site

    model, (a, _) = make_pair("bert", "lora")
    tv = task_vectors(model, [a])
    shifted = dataclasses.replace(tv.adapters[0], sites=(Site("encoder.layer.0.output", "ssf", {}, {}),))
    with pytest.raises(UnsupportedError, match=r"on 'encoder.layer.0.output' is an activation transform \(ssf\)"):
        TaskVectors(tv.modules, [shifted])


@pytest.mark.parametrize(
    ("key", "shape", "version", "error", "message"),
    [
        ("encoder.layer.0.attention.self.qery.weight", (32, 32), 1, "InputError", "the base has no tensor"),
        ("encoder.layer.0.attention.self.query.weight", (32, 31), 1, "InputError", "shape [32, 31], but the base"),
        ("encoder.layer.0.attention.self.query.weight", (32, 32), 2, "UnsupportedError", "format_version 2"),
    ],
)
def test_bad_delta_adapter_is_refused(make_pair, tmp_path, key, shape, version, error, message):
    import json

    from safetensors.torch import save_file

    from peftc import errors

    model, _ = make_pair("bert", "lora")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PEFTC_DELTA", "format_version": version}))
    save_file({key: torch.ones(shape)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(getattr(errors, error), match=re.escape(message)):
        task_vectors(model, [tmp_path])
