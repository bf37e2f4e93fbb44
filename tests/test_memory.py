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
from conftest import adapt, export

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
    """``peftc verify`` orders its work as a compile does: every oracle, then the artifact's session, whose
    files are hashed again first: a file replaced while the oracles ran is refused, never opened."""
    events, real_verify, real_check = [], modes.verify, pipeline.check_files
    copy = shutil.copytree(bert_merged.path, tmp_path / "copy")

    def spied(name, oracle):
        return lambda inputs: events.append(name) or oracle(inputs)

    def verify_spy(artifact, signature, oracles, *, base=None, **kwargs):
        (copy / "model.onnx").write_bytes(b"x")  # after the checks at the start, before the oracles
        oracles = {name: spied(name, oracle) for name, oracle in oracles.items()}
        return real_verify(artifact, signature, oracles, base=base and spied("base", base), **kwargs)

    monkeypatch.setattr(modes, "verify", verify_spy)
    monkeypatch.setattr(pipeline, "check_files", lambda *a: events.append("open") or real_check(*a))
    monkeypatch.setattr(pipeline, "open_runner", lambda *a: pytest.fail("a modified artifact was opened"))
    with pytest.raises(InputError, match=r"model.onnx: sha256 differs"):
        peftc.verify(copy, model=models.tiny_bert())
    assert events == ["reference", "peft", "base"] * 3 + ["open"]


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(12, 24), torch.nn.Linear(24, 6)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_weights_the_graph_transposes_are_stored_transposed(tmp_path, monkeypatch):
    """Unmerged ONNX for onnxruntime: no ``Transpose`` of a base weight is left for the session build to
    fold (it held both layouts at once); the outputs are bit-identical and the file is not larger."""
    torch.manual_seed(0)
    model = TwoLinears().eval()
    adapter = models.make_lora(model, tmp_path / "a", target_modules=["up", "down"])
    signature = parse_inputs(["x:batch,seq,12:float32"])
    reference = adapt(export(model, signature), adapter)
    monkeypatch.setattr(onnx_backend, "store_transposed", lambda model, keep=(): 0)  # the file as exported
    lowered = onnx_backend.OnnxBackend().lower(LowerRequest(reference, signature), tmp_path, lambda m: None)
    adapter_names = set(lowered.info["adapter_initializers"])
    exported, stored = tmp_path / "model.onnx", tmp_path / "stored.onnx"
    graph = onnx_ir.load(str(exported))
    assert store_transposed(graph, keep=adapter_names) == 2  # both linear weights
    save(graph, stored)

    def transposed_initializers(path):
        graph = onnx.load(str(path)).graph
        names = {i.name for i in graph.initializer}
        return names, {n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in names}

    names, transposed = transposed_initializers(stored)
    assert transposed and transposed <= adapter_names <= names  # adapter tensors keep their names and layout
    assert {"up.weight.T", "down.weight.T"} <= names and not {"up.weight", "down.weight"} & names
    assert stored.stat().st_size <= exported.stat().st_size
    assert transposed_initializers(exported)[1] - adapter_names  # the exporter's file had them
    inputs = {"x": signature.example({"batch": 3, "seq": 9}, seed=2)["x"].numpy()}
    before, after = OrtRunner(exported).run(inputs), OrtRunner(stored).run(inputs)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
