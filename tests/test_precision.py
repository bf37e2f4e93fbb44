"""Dtypes and precisions (``peftc/precision.py``): adapters compute as PEFT loads them, and an artifact
computes in ``--precision`` (default: the checkpoint's, where the target can), verified against the
fp32 oracles within its budget and against its own precision's within twice that."""

from __future__ import annotations

import functools
import shutil

import models
import numpy as np
import pytest
import torch
from conftest import adapt, assert_outputs_close, export
from safetensors.torch import load_file, save_file

import peftc
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders.inputs import from_transformers
from peftc.precision import UNIT_ROUNDOFF, adapter_dtype, budget, matmul_depth

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LLAMA_SITES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    return models.make_lora(models.tiny_llama(), tmp_path_factory.mktemp("llama") / "a", target_modules=LLAMA_SITES)


def _stored_as(adapter, directory, dtype):
    """A copy of ``adapter`` with its tensors stored in ``dtype`` (``mixed``: fp16 and bf16 alternating)."""
    path = shutil.copytree(adapter, directory)
    tensors = load_file(path / "adapter_model.safetensors")
    cast = {k: v.to(torch.float16 if i % 2 else torch.bfloat16) if dtype == "mixed" else v.to(DTYPES[dtype])
            for i, (k, v) in enumerate(sorted(tensors.items()))}  # fmt: skip
    save_file(cast, path / "adapter_model.safetensors")
    return path


def test_adapter_dtype_follows_peft():
    assert adapter_dtype(torch.float32, torch.float16) == torch.float32
    assert adapter_dtype(torch.bfloat16, torch.bfloat16) == torch.float32
    assert adapter_dtype(torch.float16, torch.float32) == torch.float32
    assert adapter_dtype(torch.float64, torch.float16) == torch.float64
    assert adapter_dtype(None, torch.bfloat16) == torch.float32


@functools.cache
def _traced(base: str):
    """The tiny LLaMA in ``base`` and its traced program, traced once for the four stored dtypes (the
    adapt stage never edits the program it is given; PEFT's oracle works on a copy of the model)."""
    model = models.tiny_llama().to(DTYPES[base])
    return model, export(model, from_transformers(model).in_dtype(DTYPES[base]))


@pytest.mark.parametrize("stored", ["fp32", "fp16", "bf16", "mixed"])
@pytest.mark.parametrize("base", ["fp32", "fp16", "bf16"])
def test_every_base_and_adapter_dtype_computes_as_peft(tmp_path, llama_adapter, base, stored):
    """The reference program is PEFT's own eager model, bit for bit: the adapter branch runs in the
    dtype PEFT loads it in and is added in the wider dtype, whatever the file stores."""
    adapter = _stored_as(llama_adapter, tmp_path / "a", stored)
    model, program = _traced(base)
    reference = adapt(program, adapter)
    inputs = models.text_inputs(2, 12)
    with torch.no_grad():
        got = reference.module()(**inputs).last_hidden_state.float().numpy()
    expected = models.peft_outputs(model, adapter, inputs)["last_hidden_state"]
    assert np.array_equal(got, expected)
    assert np.abs(expected - models.peft_outputs(model, [], inputs)["last_hidden_state"]).max() > 0.01


def test_a_half_precision_adapter_on_an_fp32_base_verifies_at_fp32(tmp_path, llama_adapter):
    """Was a false failure: the branch ran in fp16 while PEFT upcasts it."""
    adapter = _stored_as(llama_adapter, tmp_path / "a", "fp16")
    for merge in (True, False):
        artifact = peftc.compile(models.tiny_llama(), adapter, out=tmp_path / f"out-{merge}", merge=merge)
        assert artifact.manifest.target["precision"]["compute"] == "fp32"
        assert {o["tol_rel"] for c in artifact.manifest.verification["cases"] for o in c["outputs"]} == {1e-5}


def test_integer_adapter_tensors_are_refused(tmp_path, llama_adapter):
    adapter = shutil.copytree(llama_adapter, tmp_path / "a")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    save_file({**tensors, key: tensors[key].to(torch.int8)}, adapter / "adapter_model.safetensors")
    with pytest.raises(
        InputError, match=rf"adapter_model.safetensors:{key}: dtype int8; adapter tensors are floating point"
    ):
        peftc.compile(models.tiny_llama(), adapter, out=tmp_path / "out")


def test_budget_is_the_unit_roundoff_times_root_of_three_roundings_per_product():
    assert budget("bf16", 12) == pytest.approx(6 * 2**-8)
    assert budget("fp16", 3) == pytest.approx(3 * 2**-11)
    assert budget("bf16", 0) == pytest.approx(3**0.5 * UNIT_ROUNDOFF[torch.bfloat16])

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            return self.c(torch.relu(self.b(x)) + self.a(x))  # longest path: b, c

    from peftc.loaders import parse_inputs

    assert matmul_depth(export(Chain(), parse_inputs(["x:batch,4:float32"]))) == 2


@pytest.mark.parametrize("merge", [True, False])
def test_fp16_onnx_artifact_within_its_budget(tmp_path, bert_adapter, merge):
    model = models.tiny_bert()
    artifact = peftc.compile(model, bert_adapter, out=tmp_path / "out", precision="fp16", merge=merge)
    precision = artifact.manifest.target["precision"]
    assert precision["compute"] == "fp16" and precision["budget"] == pytest.approx(budget("fp16", precision["depth"]))
    oracles = {c["oracle"]: c["outputs"][0]["tol_rel"] for c in artifact.manifest.verification["cases"]}
    assert oracles == {"reference": precision["budget"], "peft": precision["budget"]} | {
        "reference@fp16": 2 * precision["budget"],
        "peft@fp16": 2 * precision["budget"],
    }
    assert {i["dtype"] for i in artifact.manifest.target["outputs"]} == {"float16"}
    inputs = models.text_inputs(3, 10)
    got = peftc.load(artifact.path)(**inputs)
    expected = models.peft_outputs(model, bert_adapter, inputs)
    assert_outputs_close({k: v.float() for k, v in got.items()}, expected, rel=precision["budget"])


def test_default_precision_is_the_checkpoints_where_the_target_runs_it(tmp_path, bert_adapter):
    fp16 = peftc.compile(models.tiny_bert().half(), bert_adapter, out=tmp_path / "fp16")
    assert fp16.manifest.target["precision"]["compute"] == "fp16" and "note" not in fp16.manifest.target["precision"]
    bf16 = peftc.compile(models.tiny_bert().bfloat16(), bert_adapter, out=tmp_path / "bf16")
    precision = bf16.manifest.target["precision"]
    assert precision["compute"] == "fp32" and precision["checkpoint"] == "bf16"
    assert "onnxruntime's CPU kernels have no bf16; --target aoti computes in bf16" in precision["note"]


def test_a_precision_the_target_cannot_run_is_refused(tmp_path, bert_adapter):
    with pytest.raises(
        UnsupportedError, match="--precision bf16: target 'onnx' computes in fp32, fp16, int8, .*; .* --target aoti"
    ):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="bf16")
    assert not (tmp_path / "out").exists()


def test_an_impossible_budget_fails_naming_the_worst_output(tmp_path, bert_adapter):
    with pytest.raises(VerificationError, match=r"output '\w+' vs [\w@]+.*max rel .* \(tol [12]e-07\)"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="fp16", max_error=1e-7)
    assert not (tmp_path / "out").exists()


def test_mutation_merges_rounded_through_bf16_exceed_the_fp16_budget(tmp_path, bert_adapter, monkeypatch):
    """take-state casts the fp32 program's tensors once; rounding them through bf16 first (a precision
    bug losing 3 bits of mantissa) must fail the fp16 budget."""
    from peftc.passes import take_state

    real = take_state.TakeStatePass.run

    def lossy(self, program, ctx):
        source = {k: v.to(torch.bfloat16).float() for k, v in self.options.source.state_dict.items()}
        self.options = take_state.TakeStateOptions(type("P", (), {"state_dict": source})())
        return real(self, program, ctx)

    monkeypatch.setattr(take_state.TakeStatePass, "run", lossy)
    with pytest.raises(VerificationError):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="fp16")
