"""eliminate-dead-code: unused nodes and parameters go; the outputs do not change."""

from __future__ import annotations

import models
import torch
from conftest import assert_outputs_close, eager, run_passes

from peftc import ir
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass
from peftc.passes.merge_sites import MergeSitesPass


def test_removes_unused_parameters_and_is_idempotent(bert_program):
    editor = ir.ProgramEditor(bert_program)
    editor.add_parameter("unused.weight", torch.zeros(3))
    program = editor.finish()
    cleaned, records = run_passes(program, EliminateDeadCodePass())
    assert "unused.weight" not in cleaned.state_dict and records[0].stats["state"] == 1
    _, again = run_passes(cleaned, EliminateDeadCodePass())
    assert again[0].modified is False
    inputs = models.text_inputs(2, 5)
    assert_outputs_close(eager(cleaned, inputs), eager(bert_program, inputs), rel=0.0)


def test_merge_then_cleanup_drops_every_adapter_tensor(bert_program, bert_adapter):
    from conftest import adapt

    merged, _ = run_passes(adapt(bert_program, bert_adapter), MergeSitesPass(), EliminateDeadCodePass())
    assert not [k for k in merged.state_dict if "lora_" in k]
    assert set(merged.state_dict) == set(bert_program.state_dict)
