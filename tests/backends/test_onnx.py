"""The ONNX target: translations match the site ops' eager bodies; names, dims and structure are peftc's."""

from __future__ import annotations

from collections import Counter

import models
import numpy as np
import onnx
import pytest
import torch
from conftest import adapt, export, run_passes
from onnx import numpy_helper

import peftc
from peftc.backends import LowerRequest
from peftc.backends.ort import OrtRunner
from peftc.loaders import parse_inputs
from peftc.loaders.inputs import InputSignature, from_transformers
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass
from peftc.passes.merge_sites import MergeSitesPass


def _lower(program, signature, directory, *, fuse=False):
    """The ONNX the exporter writes (by default without onnxruntime's fusions, whose renaming and
    fused ops the structure tests below do not look at)."""
    from peftc.backends.onnx import OnnxBackend

    directory.mkdir(parents=True, exist_ok=True)
    lowered = OnnxBackend(fuse=fuse).lower(LowerRequest(program, signature), directory, lambda m: None)
    return lowered, onnx.load(str(directory / "model.onnx"), load_external_data=False)


class TwoLinears(torch.nn.Module):
    """One linear with a bias, one without, so both translation branches run."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(12, 24)
        self.down = torch.nn.Linear(24, 6, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("lora_bias", [False, True])
def test_unmerged_translation_matches_eager_site_ops(tmp_path, lora_bias):
    torch.manual_seed(0)
    model = TwoLinears().eval()
    adapter = models.make_lora(model, tmp_path / "a", target_modules=["up", "down"], lora_bias=lora_bias)
    signature = parse_inputs(["x:batch,seq,12:float32"])
    reference = adapt(export(model, signature), adapter)
    _lower(reference, signature, tmp_path / "onnx")
    runner = OrtRunner(tmp_path / "onnx" / "model.onnx")
    for sizes in signature.cases():
        x = signature.example(sizes, seed=3)
        expected = reference.module()(**x).detach().numpy()
        got = runner.run({"x": x["x"].numpy()})["output"]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_mixed_dtype_translation_matches_eager(tmp_path):
    """An fp16 adapter on an fp32 base: the LoRA branch runs in fp16, as the eager body does."""
    from peftc import ir

    torch.manual_seed(0)
    model = TwoLinears().eval()
    adapter = models.make_lora(model, tmp_path / "a", target_modules=["up", "down"], b_scale=0.1)
    signature = parse_inputs(["x:batch,12:float32"])
    reference = adapt(export(model, signature), adapter)
    editor = ir.ProgramEditor(reference)
    for key in [k for k in reference.state_dict if ".lora_" in k]:
        editor.set_tensor(key, reference.state_dict[key].half())
    half_adapter = editor.finish()
    _lower(half_adapter, signature, tmp_path / "onnx")
    runner = OrtRunner(tmp_path / "onnx" / "model.onnx")
    x = signature.example({"batch": 5}, seed=1)
    expected = half_adapter.module()(**x).detach().numpy()
    got = runner.run({"x": x["x"].numpy()})["output"]
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 5e-3 * np.abs(expected).max()  # fp16 rounding of the branch


def test_conv1d_translation_matches_eager(tmp_path, gpt2_program, gpt2_adapter):
    reference = adapt(gpt2_program, gpt2_adapter)
    signature = from_transformers(models.tiny_gpt2())
    _lower(reference, signature, tmp_path)
    runner = OrtRunner(tmp_path / "model.onnx")
    inputs = models.text_inputs(3, 11)
    expected = reference.module()(**inputs).last_hidden_state.detach().numpy()
    got = runner.run({k: v.numpy() for k, v in inputs.items()})["last_hidden_state"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.fixture(scope="module")
def base_onnx(tmp_path_factory, bert_program):
    """The tiny BERT's program lowered once, read by the structure tests below."""
    return _lower(bert_program, from_transformers(models.tiny_bert()), tmp_path_factory.mktemp("base"))


def _matmuls(model):
    # A 2-D aten.linear exports as Gemm; a site's base product is a MatMul. Count both.
    ops = Counter(n.op_type for n in model.graph.node)
    return ops["MatMul"] + ops["Gemm"]


def test_matmul_counts_merged_and_unmerged(tmp_path, bert_program, bert_adapter, base_onnx):
    signature = from_transformers(models.tiny_bert())
    reference = adapt(bert_program, bert_adapter)
    merged, _ = run_passes(reference, MergeSitesPass(), EliminateDeadCodePass())
    _, base_onnx = base_onnx
    _, merged_onnx = _lower(merged, signature, tmp_path / "merged")
    lowered, unmerged_onnx = _lower(reference, signature, tmp_path / "unmerged")
    sites = 11
    assert _matmuls(merged_onnx) == _matmuls(base_onnx)
    # Unmerged: per site one thin down-projection; the up-projection shares the base GEMM through
    # two Concats ([x, x·Aᵀ] and [W, s·B], the latter folded by onnxruntime at load time).
    assert _matmuls(unmerged_onnx) == _matmuls(base_onnx) + sites
    concats = Counter(n.op_type for n in unmerged_onnx.graph.node)["Concat"]
    assert concats == Counter(n.op_type for n in base_onnx.graph.node)["Concat"] + 2 * sites
    names = {i.name for i in unmerged_onnx.graph.initializer}
    assert "encoder.layer.0.attention.self.query.lora_A.bert_lora" in names
    assert not [n for n in {i.name for i in merged_onnx.graph.initializer} if "lora" in n]
    assert len(lowered.info["adapter_initializers"]) == 2 * sites


def test_io_names_and_dims_come_from_the_signature(bert_program, base_onnx):
    lowered, model = base_onnx
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooler_output"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    assert lowered.outputs[0] == {"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "seq", 32]}
    # weights keep their state-dict names; the other initializers are folded shape arithmetic
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert set(bert_program.state_dict) <= set(initializers)
    folded = {k: v for k, v in initializers.items() if k not in bert_program.state_dict}
    assert all(v.dtype == np.int64 or v.size == 1 for v in folded.values()), folded


def test_large_models_use_external_data(tmp_path, bert_program, monkeypatch):
    import peftc.backends.onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "PROTOBUF_LIMIT", 1024)
    lowered, _ = _lower(bert_program, from_transformers(models.tiny_bert()), tmp_path)
    assert lowered.info["external_data"] is True and len(lowered.files) == 2
    runner = OrtRunner(tmp_path / "model.onnx")
    inputs = models.text_inputs(2, 4)
    expected = bert_program.module()(**inputs).last_hidden_state.detach().numpy()
    got = runner.run({k: v.numpy() for k, v in inputs.items()})["last_hidden_state"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_merged_models_are_fused_for_onnxruntime(tmp_path, bert_adapter, bert_merged):
    """A model with no adapter tensors left gets onnxruntime's transformer fusions; an unmerged one,
    whose adapter initializers keep their names, does not. SkipLayerNormalization is split back into
    Add + LayerNormalization (its CPU kernel is the slower one)."""
    merged = bert_merged.manifest.target
    assert merged["fusions"]["attention"] == 2 and "skip_layer_normalization" not in merged["fusions"]
    ops = merged["op_counts"]
    assert "Attention" in ops and "Softmax" not in ops and "SkipLayerNormalization" not in ops
    assert ops["LayerNormalization"] == 5, ops  # embeddings + 2 per layer
    unmerged = peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "unmerged", merge=False).manifest.target
    assert unmerged["fusions"] == {} and "SkipLayerNormalization" not in unmerged["op_counts"]


def test_a_fusion_that_fails_keeps_the_unfused_model(tmp_path, bert_adapter, monkeypatch):
    from onnxscript.rewriter import ort_fusions

    def broken(model):
        raise RuntimeError("rewriter bug")

    monkeypatch.setattr(ort_fusions, "optimize_for_ort", broken)
    artifact = peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out")
    assert artifact.manifest.status == "ok" and artifact.manifest.target["fusions"] == {}
    assert {"what": "onnxruntime fusions", "reason": "kept the unfused model: RuntimeError: rewriter bug"} in (
        artifact.manifest.not_run
    )


def test_a_fusion_that_changes_the_outputs_keeps_the_unfused_model(tmp_path, bert_program, monkeypatch):
    """The fused model is checked against the eager program it came from: a rewrite that scales a
    weight is caught and the unfused model is kept."""
    import onnx_ir
    from onnxscript.rewriter import ort_fusions

    fuse = ort_fusions.optimize_for_ort

    def scaling(model):
        model, counts = fuse(model)
        value = next(
            v for v in model.graph.initializers.values() if v.const_value.size > 1 and v.dtype.is_floating_point()
        )
        value.const_value = onnx_ir.tensor(value.const_value.numpy() * 1.5)
        return model, counts

    monkeypatch.setattr(ort_fusions, "optimize_for_ort", scaling)
    derived = from_transformers(models.tiny_bert())  # the inputs bert_program takes (no token_type_ids)
    signature = InputSignature(tuple(i for i in derived.inputs if i.default is None), derived.dims)
    lowered, _ = _lower(bert_program, signature, tmp_path, fuse=True)
    assert lowered.info["fusions"] == {} and "Attention" not in lowered.info["op_counts"]
    (reason,) = [why for what, why in lowered.not_run if what == "onnxruntime fusions"]
    assert "differs from the unfused one" in reason, reason
    inputs = models.text_inputs(2, 4)
    expected = bert_program.module()(**inputs).last_hidden_state.detach().numpy()
    got = OrtRunner(tmp_path / "model.onnx").run({k: v.numpy() for k, v in inputs.items()})["last_hidden_state"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_the_fusion_check_builds_its_session_after_the_exported_model_is_freed(tmp_path, bert_program, monkeypatch):
    """The fused model's folded weights and the exporter's model are freed, and the program's file-mapped
    weights paged out, before onnxruntime builds the fused model's session (the collection threshold is
    lowered to this tiny model)."""
    import weakref

    import peftc.backends.ort as ort_module
    from peftc import memory
    from peftc.backends.onnx import fusion

    fused, exported, events = fusion.fused, [], []

    def tracked(path, model, summarize):
        exported.append(weakref.ref(model))
        return fused(path, model, summarize)

    class Checked(ort_module.OrtRunner):
        def __init__(self, path, **kwargs):
            events.append(("session", exported[0]() is None))
            super().__init__(path, **kwargs)

    monkeypatch.setattr(memory, "COLLECT_BYTES", 0)
    monkeypatch.setattr(fusion, "fused", tracked)
    monkeypatch.setattr(ort_module, "OrtRunner", Checked)
    monkeypatch.setattr(memory, "page_out", lambda tensors: events.append(("page_out", len(list(tensors)))) or 0)
    derived = from_transformers(models.tiny_bert())
    signature = InputSignature(tuple(i for i in derived.inputs if i.default is None), derived.dims)
    lowered, _ = _lower(bert_program, signature, tmp_path, fuse=True)
    assert lowered.info["fusions"]["attention"] == 2
    assert events == [("page_out", len(bert_program.state_dict) + len(bert_program.constants)), ("session", True)]
