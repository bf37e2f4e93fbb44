"""The numeric check ``peftc.compile`` runs, without lowering: an adapted program against PEFT's eager
model, on the compile's seeded input shapes. Mutation tests use it to show that verification catches a
broken formula at a fraction of a whole compile's cost (the lowering adds nothing to that check)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import adapt, export

from peftc import ir
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter
from peftc.verification import Report, peft_oracle, program_oracle, verify


def check_against_peft(
    model: torch.nn.Module, adapter: Path, inputs: list[str], program: ir.Program | None = None
) -> Report:
    """``model`` with ``adapter`` inserted by peftc (the reference program) against PEFT's own model
    (``program``: ``model`` already traced with ``inputs``, to trace it once for many adapters)."""
    signature = parse_inputs(inputs)
    program = program if program is not None else export(model, signature)
    reference = adapt(program, adapter)
    peft, why = peft_oracle(model, [load_adapter(adapter, ir.module_table(program))])
    assert peft is not None, why
    compiled = program_oracle(reference)
    return verify(compiled, signature, {"peft": peft}, base=program_oracle(program))


def assert_caught(report: Report) -> None:
    """The check failed, against PEFT, with the compile's message."""
    assert not report.passed
    message = str(report.error())
    assert message.startswith("verification failed: output ") and " vs peft " in message, message
