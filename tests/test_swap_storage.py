"""Adapter files stored in fp16 or int8 with per-row scales (``--slot-dtype``): every adapter is within
the format's budget of PEFT, switching is exact, the files are smaller, add-adapter keeps the
artifact's format and refuses an adapter over budget, and a broken scale is caught."""

from __future__ import annotations

import dataclasses
import shutil

import models
import numpy as np
import pytest
from cli_run import error_line, run

import peftc
from peftc.errors import InputError, VerificationError
from peftc.hashing import sha256_file
from peftc.swap import add_adapter, storage
from peftc.swap.files import slot_values

TARGETS = ["query", "value", "pooler.dense"]


def _lora(model, path, seed, noise=0.3, **config):
    from peft import LoraConfig

    return models.make_adapter(model, path, LoraConfig(**config), seed=seed, noise=noise)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A tiny BERT with two LoRA adapters (outputs changed by 59 % and 5 % of their scale), compiled with
    int8 slot files and a bank of 2; the same adapters' slot values as fp16 files beside it."""
    from peftc.backends import get_backend
    from peftc.swap.table import SlotTable

    root = tmp_path_factory.mktemp("slot-dtype")
    model = models.tiny_bert()
    adapters = {
        "a": _lora(model, root / "a", 1, noise=0.1, r=4, lora_alpha=8, target_modules=TARGETS),
        "b": _lora(model, root / "b", 2, r=2, lora_alpha=3, use_rslora=True, target_modules=["query", "value"]),
    }
    out = peftc.compile(model, list(adapters.values()), out=root / "int8", swappable=True, slot_dtype="int8",
                        multi_adapter=2).path  # fmt: skip
    table = SlotTable.from_json(peftc.load(out).manifest.target["slots"])
    fp16 = {}
    for name, path in adapters.items():  # the slot values peftc packs, stored as --slot-dtype fp16 would
        values = slot_values(dataclasses.replace(table, slot_dtype="fp32"), _parsed(model, path))
        fp16[name] = root / f"{name}-fp16.onnx_adapter"
        get_backend("onnx").write_adapter(fp16[name], storage.encode(values, "fp16"))
    return model, adapters, out, fp16


def _parsed(model, path):
    from peftc import ir
    from peftc.methods.base import ParseOptions
    from peftc.methods.loading import read_adapter
    from peftc.methods.registry import parse_adapter

    return parse_adapter(read_adapter(path), ir.module_table_from_module(model), ParseOptions())


def _relative_error(got, expected):
    return max(float(np.abs(got[k] - expected[k]).max() / np.abs(expected[k]).max()) for k in expected)


@pytest.mark.parametrize("dtype", ["int8", "fp16"])
def test_every_adapter_is_within_the_format_budget_of_peft(stored, dtype):
    model, adapters, out, fp16 = stored
    runner = peftc.load(out)
    slots = runner.manifest.target["slots"]
    assert slots["slot_dtype"] == "int8" and slots["slot_depth"] == 3  # layer-0 value → layer-1 value → pooler
    assert runner.manifest.options["slot_dtype"] == "int8"
    assert slots["slot_budget"] == pytest.approx((2 * 3) ** 0.5 / 254)  # half a step of max|row|/127, 6 operands
    cases = runner.manifest.verification["cases"]
    assert {"peft[a]", "peft[b]", "mixed batch"} <= {c["oracle"] for c in cases}
    budget = slots["slot_budget"] if dtype == "int8" else 2.0**-11 * 6**0.5  # fp16's unit roundoff
    if dtype == "fp16":
        for name, path in fp16.items():
            runner.backend_runner.register(name, path)
    inputs = models.text_inputs(2, 12)
    base = {k: v.numpy() for k, v in runner(**inputs, adapter=None).items()}
    for name, path in adapters.items():
        expected = models.peft_outputs(model, path, inputs)
        error = _relative_error(runner(**inputs, adapter=name), expected)
        assert 1e-6 < error <= budget  # rounded, yet within the budget
        assert _relative_error(base, expected) > 20 * error  # the adapter changes far more than storage does


def test_switching_back_is_bit_identical(stored):
    _, _, out, _ = stored
    inputs = {k: v.numpy() for k, v in models.text_inputs(3, 9).items()}
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    fresh = peftc.load(out)(**inputs, adapter="a")
    runner = peftc.load(out)
    for name in ["a", "b", None, "a"]:
        again = runner(**inputs, adapter=name)
    assert all(np.array_equal(fresh[k], again[k]) for k in fresh)
    mixed = runner(**inputs, adapter=["b", "a", None])
    assert np.array_equal(mixed["pooler_output"][1], fresh["pooler_output"][1])
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files  # decoding writes nothing into it


def test_files_are_smaller_and_hold_int8_with_scales(stored, tmp_path):
    import onnxruntime as ort

    from peftc.backends import get_backend

    _, _, out, fp16 = stored
    int8 = out / "adapters" / "a.onnx_adapter"
    values = {k: v.numpy().copy() for k, v in ort.AdapterFormat.read_adapter(str(int8)).get_parameters().items()}
    quantized = [k for k, v in values.items() if v.dtype == np.int8]
    assert quantized and all(values[k + ".scale"].shape == values[k].shape[:1] for k in quantized)
    fp32 = tmp_path / "a.onnx_adapter"  # the same values as an fp32 file
    get_backend("onnx").write_adapter(fp32, storage.decode(values, "float32"))
    assert int8.stat().st_size < fp32.stat().st_size and fp16["a"].stat().st_size < fp32.stat().st_size
    # The payload (the file adds a name and a header per tensor, which tiny slots make count):
    floats = sum(v.nbytes for k, v in values.items() if k not in quantized and not k.endswith(".scale"))
    payload = {
        "int8": sum(v.nbytes for v in values.values()) - floats,
        "fp32": 4 * sum(values[k].size for k in quantized),
    }
    assert floats == 0 and payload["int8"] == sum(values[k].size + 4 * values[k].shape[0] for k in quantized)
    assert payload["int8"] / payload["fp32"] < 0.45  # 1 byte a value and 4 a row (rank 4: B rows hold 4 values)


def _hashes(directory):
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_add_adapter_uses_the_artifact_format_and_refuses_over_budget(stored, tmp_path, monkeypatch):
    model, _, out, _ = stored
    artifact = shutil.copytree(out, tmp_path / "artifact")
    # An adapter that changes the outputs by more than their own scale: int8 rounding of its factors
    # exceeds the budget (relative to the output scale); refused with the measured error, nothing changed.
    loud = _lora(model, tmp_path / "loud", 3, noise=1.0, r=4, lora_alpha=8, target_modules=TARGETS)
    before = _hashes(artifact)
    with pytest.raises(VerificationError, match=r"max rel 0\.0[1-9]\d* \(tol 0\.0096"):
        add_adapter(artifact, loud, model=model)
    assert _hashes(artifact) == before
    # Mutation: scales twice what the int8 values were rounded with (a wrong formula) must be caught.
    real = storage.quantize

    def coarse(value):
        q, scale = real(value)
        return q, scale * 2

    monkeypatch.setattr(storage, "quantize", coarse)
    extra = _lora(model, tmp_path / "extra", 4, r=3, lora_alpha=5, target_modules=["value"])
    with pytest.raises(VerificationError, match=r"\[extra\]"):
        add_adapter(artifact, extra, model=model)
    assert _hashes(artifact) == before


def test_bad_slot_dtype_is_one_line(capsys, stored, tmp_path):
    adapter = stored[1]["a"]
    code, _, err = run(capsys, "compile", "x", "--adapter", adapter, "-o", tmp_path / "o", "--swappable",
                       "--slot-dtype", "int4")  # fmt: skip
    assert code == 2 and error_line(err).endswith("--slot-dtype 'int4': use one of fp32, fp16, int8")
    with pytest.raises(InputError, match="--slot-dtype int8 applies to --swappable artifacts only"):
        peftc.compile(stored[0], adapter, out=tmp_path / "o", slot_dtype="int8")
