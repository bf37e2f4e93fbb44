"""Memory handed back during a compile: file-mapped weights paged out (their values kept), the
artifact's runner opened only after every oracle ran (also in ``peftc verify``), weights stored in the
layout the ONNX graph reads. No RSS is measured here (``benchmarks/rss.py``)."""

from __future__ import annotations

import shutil
import sys

import models
import numpy as np
import onnx
import onnx_ir
import pytest
import torch
from conftest import adapt

import peftc
import peftc.backends.onnx as onnx_backend
from peftc import memory
from peftc.backends import LowerRequest
from peftc.backends.onnx.streaming import save
from peftc.backends.onnx.transposes import store_transposed
from peftc.backends.ort import OrtRunner
from peftc.driver import modes, pipeline
from peftc.driver.deferred import DeferredRunner
from peftc.errors import InputError
from peftc.loaders import parse_inputs
from peftc.loaders.inputs import from_transformers
from peftc.verification import verify

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")


@linux
def test_page_out_keeps_the_values_of_file_mapped_tensors_and_skips_anonymous_ones(tmp_path):
    path = tmp_path / "weights.bin"
    values = np.arange(3 * 4096, dtype=np.float32)
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private, like safetensors' mapping
    written = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    written[:10] = -1.0  # its first page is now the process's own copy: it must survive
    anonymous = torch.from_numpy(values.copy())
    assert memory.page_out([anonymous]) == 0
    advised = memory.page_out([mapped, mapped[5:], written, anonymous])
    assert advised in (0, 2 * values.nbytes)  # 0: a kernel without MADV_PAGEOUT
    assert torch.equal(mapped, torch.from_numpy(values))
    assert torch.equal(written[:10], torch.full((10,), -1.0)) and torch.equal(written[10:], mapped[10:])


def test_verify_runs_every_oracle_before_the_artifact_and_reports_in_case_order():
    signature = parse_inputs(["x:batch,seq,4:float32"])
    calls = []

    def oracle(name):
        def run(inputs):
            calls.append(name)
            return {"y": inputs["x"].numpy() * 2}

        return run

    def artifact(inputs):
        calls.append("artifact")
        return {"y": inputs["x"].numpy() * 2}

    report = verify(
        artifact, signature, {"reference": oracle("reference"), "peft": oracle("peft")}, base=oracle("base")
    )
    assert calls == ["reference", "peft", "base"] * 3 + ["artifact"] * 3
    assert report.passed and [c.oracle for c in report.cases] == ["reference", "peft"] * 3
    assert [c.seed for c in report.cases] == [0, 0, 1, 1, 2, 2]


def test_a_deferred_runner_pages_the_weights_out_then_opens_once(monkeypatch):
    events = []
    monkeypatch.setattr(memory, "page_out", lambda tensors: events.append(("page_out", list(tensors))) or 0)

    class Runner:
        input_names = ("x",)

        def run(self, feeds):
            return {"y": feeds["x"]}

    def opening():
        events.append(("open", None))
        return Runner()

    weight = torch.ones(3)
    runner = DeferredRunner(opening, lambda: iter([weight]))
    assert not runner.opened and events == []
    assert runner.input_names == ("x",) and runner.run({"x": 1}) == {"y": 1}
    assert runner.opened and [e[0] for e in events] == ["page_out", "open"] and events[0][1] == [weight]


def test_verify_opens_the_artifact_after_every_oracle_and_hashes_its_files_again(tmp_path, bert_merged, monkeypatch):
    """``peftc verify`` orders its work as a compile does: the oracles, then the artifact's session;
    a file changed while the oracles ran is refused when the session opens."""
    events, real_verify, real_open = [], modes.verify, pipeline.open_runner

    def spied(name, oracle):
        return lambda inputs: events.append(name) or oracle(inputs)

    def verify_spy(artifact, signature, oracles, *, base=None, **kwargs):
        oracles = {name: spied(name, oracle) for name, oracle in oracles.items()}
        return real_verify(artifact, signature, oracles, base=base and spied("base", base), **kwargs)

    monkeypatch.setattr(modes, "verify", verify_spy)
    monkeypatch.setattr(pipeline, "open_runner", lambda *a: events.append("open") or real_open(*a))
    model = models.tiny_bert()
    assert peftc.verify(bert_merged.path, model=model).passed
    assert events == ["reference", "peft", "base"] * 3 + ["open"]

    copy = shutil.copytree(bert_merged.path, tmp_path / "copy")
    events.clear()

    def replacing_the_model(*args, **kwargs):
        (copy / "model.onnx").write_bytes(b"x")  # after the checks at the start, before the oracles
        return verify_spy(*args, **kwargs)

    monkeypatch.setattr(modes, "verify", replacing_the_model)
    with pytest.raises(InputError, match=r"model.onnx: sha256 differs"):
        peftc.verify(copy, model=model)
    assert "open" not in events


def test_weights_the_graph_transposes_are_stored_transposed(tmp_path, bert_program, bert_adapter, monkeypatch):
    """Unmerged ONNX for onnxruntime: no ``Transpose`` of a base weight is left for the session build to
    fold (it held both layouts at once); the outputs are bit-identical and the file is not larger."""
    monkeypatch.setattr(onnx_backend, "store_transposed", lambda model, keep=(): 0)  # the file as exported
    reference, signature = adapt(bert_program, bert_adapter), from_transformers(models.tiny_bert())
    lowered = onnx_backend.OnnxBackend().lower(LowerRequest(reference, signature), tmp_path, lambda m: None)
    adapter_names = set(lowered.info["adapter_initializers"])
    exported, stored = tmp_path / "model.onnx", tmp_path / "stored.onnx"
    model = onnx_ir.load(str(exported))
    assert store_transposed(model, keep=adapter_names) == 13  # q, k, v, o, up, down of 2 layers; the pooler
    save(model, stored)

    def transposed_initializers(path):
        graph = onnx.load(str(path)).graph
        names = {i.name for i in graph.initializer}
        return names, {n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in names}

    names, transposed = transposed_initializers(stored)
    assert transposed and transposed <= adapter_names <= names  # adapter tensors keep their names and layout
    assert "encoder.layer.0.attention.self.query.weight.T" in names
    assert stored.stat().st_size <= exported.stat().st_size
    assert transposed_initializers(exported)[1] - adapter_names  # the exporter's file had them
    runners = OrtRunner(exported), OrtRunner(stored)
    texts = {k: v.numpy() for k, v in models.text_inputs(3, 9).items()}
    inputs = {k: texts.get(k, np.zeros_like(texts["input_ids"])) for k in runners[0].input_names}
    before, after = (runner.run(inputs) for runner in runners)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
