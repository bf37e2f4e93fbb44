"""merge: call and weight sites fold exactly into the weights; refusals with reasons; idempotent."""

from __future__ import annotations

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, export, run_passes

from peftc import ir
from peftc.errors import InputError
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass
from peftc.passes.merge_sites import MergeSitesPass


def _merge(program):
    return run_passes(program, MergeSitesPass(), EliminateDeadCodePass())


def test_merged_graph_is_the_base_graph(bert_program, bert_adapter):
    merged, records = _merge(adapt(bert_program, bert_adapter))
    assert records[0].stats == {"merged": 11, "skipped": 0, "untied": 0}
    assert ir.op_counts(merged)["peftc.lora_linear"] == 0
    # Same ops on the same parameters as the base after the same cleanup; only weight values differ.
    base, _ = run_passes(bert_program, EliminateDeadCodePass())
    assert ir.text(merged) == ir.text(base)


def test_merged_weight_is_w_plus_scaled_ba(bert_program, bert_adapter):
    from safetensors.torch import load_file

    merged, _ = _merge(adapt(bert_program, bert_adapter))
    tensors = load_file(bert_adapter / "adapter_model.safetensors")
    prefix = "base_model.model.encoder.layer.1.attention.self.value"
    a, b = tensors[f"{prefix}.lora_A.weight"].double(), tensors[f"{prefix}.lora_B.weight"].double()
    key = "encoder.layer.1.attention.self.value.weight"
    expected = bert_program.state_dict[key].double() + (8 / 4) * b @ a  # alpha 8, r 4
    torch.testing.assert_close(merged.state_dict[key].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(2, 16), (3, 7)])
def test_merged_equals_reference(bert_program, bert_adapter, seed, shape):
    reference = adapt(bert_program, bert_adapter)
    merged, _ = _merge(reference)
    inputs = models.text_inputs(*shape, seed=seed)
    assert_outputs_close(eager(merged, inputs), eager(reference, inputs))


def test_fan_in_fan_out_merges_into_conv1d_layout(gpt2_program, gpt2_adapter):
    reference = adapt(gpt2_program, gpt2_adapter)
    merged, _ = _merge(reference)
    counts = ir.op_counts(merged)
    assert counts["peftc.lora_linear"] == 0 and counts["aten.matmul"] >= 6
    assert merged.state_dict["h.0.attn.c_attn.weight"].shape == gpt2_program.state_dict["h.0.attn.c_attn.weight"].shape
    inputs = models.text_inputs(2, 9)
    assert_outputs_close(eager(merged, inputs), eager(reference, inputs))


def test_lora_bias_is_merged_into_base_bias(tmp_path, bert_program):
    adapter = models.make_lora(models.tiny_bert(), tmp_path / "a", target_modules=["query"], lora_bias=True)
    reference = adapt(bert_program, adapter)
    merged, _ = _merge(reference)
    assert "encoder.layer.0.attention.self.query.lora_B_bias.a" not in merged.state_dict
    inputs = models.text_inputs(2, 6)
    assert_outputs_close(eager(merged, inputs), eager(reference, inputs))


def test_lora_bias_on_a_module_without_bias_creates_one(tmp_path):
    class NoBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = NoBias().eval()
    adapter = models.make_lora(model, tmp_path / "a", target_modules=["proj"], lora_bias=True)
    from peftc.loaders import parse_inputs

    reference = adapt(export(model, parse_inputs(["x:batch,8:float32"])), adapter)
    merged, _ = _merge(reference)
    assert "proj.bias" in merged.state_dict and ir.op_counts(merged)["peftc.lora_linear"] == 0
    x = {"x": torch.randn(3, 8)}
    assert_outputs_close(eager(merged, x), models.peft_outputs(model, adapter, x))


def test_second_run_changes_nothing(bert_program, bert_adapter):
    merged, _ = _merge(adapt(bert_program, bert_adapter))
    _, records = run_passes(merged, MergeSitesPass())
    assert records[0].modified is False and records[0].stats["merged"] == 0


def _with_weight(reference, module, make):
    editor = ir.ProgramEditor(reference)
    make(editor, editor.node_for(f"{module}.weight"))
    return editor.finish()


def test_skips_quantized_base_weight(bert_program, bert_adapter):
    module = "encoder.layer.0.attention.self.query"
    reference = adapt(bert_program, bert_adapter)
    quantized = _with_weight(
        reference, module, lambda ed, w: ed.set_tensor(f"{module}.weight", ed.tensor(w).to(torch.int8))
    )
    _, records = run_passes(quantized, MergeSitesPass())
    (skip,) = records[0].diagnostics
    assert skip.site == module and "int8" in skip.message and "--no-merge" in skip.message
    assert records[0].stats["merged"] == 10 and records[0].stats["skipped"] == 1


def test_skips_weight_computed_in_graph(bert_program, bert_adapter):
    module = "encoder.layer.0.attention.self.query"

    def scale_weight(editor, weight):
        site = next(u for u in weight.users if u.target is torch.ops.peftc.lora_linear.default)
        doubled = editor.call(torch.ops.aten.mul.Tensor, (weight, 2.0), like=site)
        site.replace_input_with(weight, doubled)

    computed = _with_weight(adapt(bert_program, bert_adapter), module, scale_weight)
    _, records = run_passes(computed, MergeSitesPass())
    assert [d.site for d in records[0].diagnostics] == [module]
    assert "computed in the graph" in records[0].diagnostics[0].message


def test_unties_a_weight_shared_with_an_unadapted_module(tmp_path):
    model = models.tied()
    adapter = models.make_lora(model, tmp_path / "t", target_modules=["a"])
    from peftc.loaders import parse_inputs

    reference = adapt(export(model, parse_inputs(models.TIED_INPUTS)), adapter)
    # Route module b through the very placeholder the site reads, so merging must not touch it.
    editor = ir.ProgramEditor(reference)
    site_weight = editor.node_for("a.weight")
    b_linear = next(n for n in editor.graph.nodes if n.target is torch.ops.aten.linear.default)
    b_linear.replace_input_with(b_linear.args[1], site_weight)
    shared = editor.finish()
    merged, records = _merge(shared)
    assert records[0].stats["untied"] == 1
    x = {"x": torch.randn(4, 8)}
    assert_outputs_close(eager(merged, x), eager(reference, x))
    assert_outputs_close(eager(merged, x), models.peft_outputs(model, adapter, x))


def test_broken_adapter_is_an_error(bert_program, bert_adapter):
    reference = adapt(bert_program, bert_adapter)
    editor = ir.ProgramEditor(reference)
    key = "encoder.layer.0.attention.self.query.lora_B.bert_lora"
    editor.set_tensor(key, torch.full_like(editor.tensor(editor.node_for(key)), float("inf")))
    with pytest.raises(InputError, match="merged weight of 'encoder.layer.0.attention.self.query' is not finite"):
        run_passes(editor.finish(), MergeSitesPass())
