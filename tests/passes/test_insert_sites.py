"""insert-sites: one peftc::lora_linear per adapted module call, reference semantics equal PEFT's."""

from __future__ import annotations

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, export

from peftc import ir
from peftc.errors import PreconditionError
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager
from peftc.passes.insert_sites import InsertSitesPass


def test_inserts_one_site_per_adapted_linear(bert_program, bert_adapter):
    reference = adapt(bert_program, bert_adapter)
    counts = ir.op_counts(reference)
    # 11 adapted linears (query, value, three dense per layer, pooler); key is not adapted.
    assert counts["peftc.lora_linear"] == 11 and counts["aten.linear"] == 2
    for node in reference.graph.nodes:
        if node.op == "call_function" and ir.meta.module_path(node) == "encoder.layer.0.attention.self.query":
            assert node.target is torch.ops.peftc.lora_linear.default


def test_adapter_tensors_are_named_parameters_with_provenance(bert_program, bert_adapter):
    reference = adapt(bert_program, bert_adapter)
    key = "encoder.layer.1.attention.self.value.lora_B.bert_lora"
    assert key in reference.state_dict
    node = next(n for n in reference.graph.nodes if ir.placeholder_fqn(reference, n) == key)
    assert node.meta["peftc"]["source"] == (
        "adapter_model.safetensors:base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    )


def test_replaces_whole_conv1d_region(gpt2_program, gpt2_adapter):
    reference = adapt(gpt2_program, gpt2_adapter)
    counts = ir.op_counts(reference)
    assert counts["peftc.lora_linear"] == 6  # attn.c_attn, attn.c_proj, mlp.c_proj in two blocks
    assert counts["aten.addmm"] == 2  # only mlp.c_fc is left as the original Conv1D region


@pytest.mark.parametrize(
    ("build", "adapter_fixture"), [(models.tiny_bert, "bert_adapter"), (models.tiny_gpt2, "gpt2_adapter")]
)
@pytest.mark.parametrize("shape", [(2, 16), (1, 5)])
def test_reference_program_equals_peft(request, build, adapter_fixture, shape):
    model = build()
    adapter = request.getfixturevalue(adapter_fixture)
    reference = adapt(export(model), adapter)
    inputs = models.text_inputs(*shape)
    assert_outputs_close(eager(reference, inputs), models.peft_outputs(model, adapter, inputs), rel=1e-6)


def test_module_called_twice_gets_two_sites_sharing_tensors(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(torch.tanh(self.proj(x)))

    torch.manual_seed(0)
    model = Twice().eval()
    adapter = models.make_lora(model, tmp_path / "a", target_modules=["proj"])
    signature = __import__("peftc").loaders.parse_inputs(["x:batch,8:float32"])
    reference = adapt(export(model, signature), adapter)
    assert ir.op_counts(reference)["peftc.lora_linear"] == 2
    assert sum("lora_A" in k for k in reference.state_dict) == 1
    x = {"x": torch.randn(3, 8)}
    assert_outputs_close(eager(reference, x), models.peft_outputs(model, adapter, x), rel=1e-6)


def test_refuses_to_insert_twice(bert_program, bert_adapter):
    reference = adapt(bert_program, bert_adapter)
    adapter = load_adapter(bert_adapter, ir.module_table(bert_program))
    with pytest.raises(PreconditionError, match="already has a site node"):
        PassManager([InsertSitesPass((adapter,))]).run(reference, PassContext())


def test_stacked_adapters_become_composed_weight_sites(tmp_path, bert_program, bert_adapter):
    second = models.make_lora(models.tiny_bert(), tmp_path / "second", seed=5, target_modules=["query", "key"])
    reference = adapt(bert_program, bert_adapter, second)
    counts = ir.op_counts(reference)
    # query (2 layers) is adapted by both: two chained weight sites each. Every other adapted module
    # has one adapter and keeps its call site: 9 of the first adapter's, key's 2 of the second's.
    assert counts["peftc.lora_weight"] == 2 * 2 and counts["peftc.lora_linear"] == 9 + 2
    query = next(
        n
        for n in reference.graph.nodes
        if n.meta.get("peftc", {}).get("module") == "encoder.layer.0.attention.self.query"
        and n.meta["peftc"]["adapter"] == "second"
    )
    assert query.args[0].target is torch.ops.peftc.lora_weight.default  # second transforms the first's output
    inputs = models.text_inputs(2, 8)
    # The composed weight rounds differently from PEFT's sum of branches (seen 1.4e-6 on the pooler):
    # the fp32 bound every compile verifies with, not a tighter one.
    assert_outputs_close(
        eager(reference, inputs), models.peft_outputs(models.tiny_bert(), [bert_adapter, second], inputs)
    )
