"""Memory handed back during a compile: file-mapped weights paged out (their values kept), the
artifact's runner opened only after every oracle ran. No RSS is measured here (``benchmarks/rss.py``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from peftc import memory
from peftc.driver.deferred import DeferredRunner
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
