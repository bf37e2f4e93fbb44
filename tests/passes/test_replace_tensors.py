"""replace-tensors: modules_to_save and trained biases replace base parameters as PEFT loads them."""

from __future__ import annotations

import models
import torch
from conftest import adapt, assert_outputs_close, eager, export, run_passes

from peftc import ir
from peftc.loaders import parse_inputs
from peftc.passes.replace_tensors import ReplaceTensorsPass


def test_modules_to_save_and_trained_biases_match_peft(tmp_path):
    model = models.tiny_bert(head=True)
    adapter = models.make_lora(
        model, tmp_path / "a", target_modules=["query", "value"], modules_to_save=["classifier"], bias="all"
    )
    program = export(model)
    reference = adapt(program, adapter)
    assert not torch.equal(reference.state_dict["classifier.weight"], program.state_dict["classifier.weight"])
    for shape in [(2, 8), (1, 13)]:
        inputs = models.text_inputs(*shape)
        assert_outputs_close(eager(reference, inputs), models.peft_outputs(model, adapter, inputs), rel=1e-6)


def test_replacing_a_tied_module_unties_it(tmp_path):
    model = models.tied()
    adapter = models.make_lora(model, tmp_path / "t", target_modules=["a"], modules_to_save=["b"])
    program = export(model, parse_inputs(models.TIED_INPUTS))
    from peftc.methods.loading import load_adapter

    parsed = load_adapter(adapter, ir.module_table(program))
    _, records = run_passes(program, ReplaceTensorsPass((parsed,)))
    assert records[0].stats == {"replaced": 2, "untied": 1}
    x = {"x": torch.randn(5, 8)}
    assert_outputs_close(eager(adapt(program, adapter), x), models.peft_outputs(model, adapter, x), rel=1e-6)


def test_no_replacements_is_a_no_op(bert_program, bert_adapter):
    from peftc.methods.loading import load_adapter

    parsed = load_adapter(bert_adapter, ir.module_table(bert_program))
    _, records = run_passes(bert_program, ReplaceTensorsPass((parsed,)))
    assert records[0].modified is False
