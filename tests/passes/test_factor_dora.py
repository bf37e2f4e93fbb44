"""factor-dora: DoRA's norm becomes a compile-time factor; numbers unchanged; stacked sites left alone."""

from __future__ import annotations

import models
import pytest
from conftest import assert_outputs_close, eager, export, run_passes

from peftc import ir
from peftc.methods.loading import load_adapter
from peftc.methods.lora.factor_dora import FactorDoraPass
from peftc.passes import PassContext, PassManager, pipelines
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass


@pytest.fixture(scope="module")
def dora_reference(tmp_path_factory):
    from peft import LoraConfig

    model = models.tiny_llama()
    config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    adapter = models.make_adapter(model, tmp_path_factory.mktemp("dora") / "a", config)
    program = export(model)
    table = ir.module_table(program)
    reference, _ = PassManager(pipelines.adapt([load_adapter(adapter, table)])).run(program, PassContext())
    return model, adapter, reference


def test_every_norm_is_precomputed(dora_reference):
    _, _, reference = dora_reference
    factored, records = run_passes(reference, FactorDoraPass(), EliminateDeadCodePass())
    counts = ir.op_counts(factored)
    assert counts["peftc.dora_weight"] == 0 and counts["peftc.dora_factored_weight"] == 6
    assert records[0].stats == {"factored": 6, "skipped": 0}
    keys = set(factored.state_dict)
    assert len([k for k in keys if ".dora_factor." in k]) == 6 and not [k for k in keys if ".magnitude." in k]
    factor = next(n for n in factored.graph.nodes if ".dora_factor." in (ir.placeholder_fqn(factored, n) or ""))
    assert factor.meta["peftc"]["source"].endswith("lora_magnitude_vector / ‖W + s·B·A‖")


@pytest.mark.parametrize("shape", [(2, 16), (1, 5), (3, 9)])
def test_numbers_are_unchanged_and_match_peft(dora_reference, shape):
    model, adapter, reference = dora_reference
    factored, _ = run_passes(reference, FactorDoraPass(), EliminateDeadCodePass())
    inputs = models.text_inputs(*shape)
    assert_outputs_close(eager(factored, inputs), eager(reference, inputs), rel=1e-6)
    assert_outputs_close(eager(factored, inputs), models.peft_outputs(model, adapter, inputs))


def test_second_run_changes_nothing(dora_reference):
    _, _, reference = dora_reference
    factored, _ = run_passes(reference, FactorDoraPass())
    _, records = run_passes(factored, FactorDoraPass())
    assert records[0].modified is False and records[0].stats["factored"] == 0


def test_stacked_site_is_left_with_a_reason(tmp_path, bert_adapter):
    from peft import LoraConfig

    model = models.tiny_bert()
    dora = models.make_adapter(model, tmp_path / "dora", LoraConfig(target_modules=["query"], use_dora=True))
    program = export(model)
    table = ir.module_table(program)
    adapters = [load_adapter(bert_adapter, table), load_adapter(dora, table)]
    reference, _ = PassManager(pipelines.adapt(adapters)).run(program, PassContext())
    factored, records = run_passes(reference, FactorDoraPass())
    assert records[0].stats == {"factored": 0, "skipped": 2}
    assert {d.site for d in records[0].diagnostics} == {f"encoder.layer.{i}.attention.self.query" for i in (0, 1)}
    assert all("stacked" in d.message for d in records[0].diagnostics)
    inputs = models.text_inputs(2, 7)
    assert_outputs_close(eager(factored, inputs), models.peft_outputs(model, [bert_adapter, dora], inputs))
