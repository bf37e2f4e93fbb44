"""QLoRA on a bitsandbytes base: the ONNX lowering of the quantized layers and of the two-path site ops,
and the nibble order (the merge policies through ``peftc compile``: ``test_qlora_compile.py``).

The exact oracle is PEFT on an fp32 model whose weights are bitsandbytes' own dequantization of the
checkpoint (:func:`dequantized_peft`, the reference of the unmerged QLoRA model).
"""

from __future__ import annotations

import bnb_checkpoints
import pytest
import torch

from peftc.errors import InputError
from peftc.loaders.inputs import parse_inputs
from peftc.quant import bnb, qlora

pytest.importorskip("bitsandbytes")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
EXACT = 1e-5  # fp32 against fp32: the same products summed in another order
KERNEL = 2e-2
"""A wrong decoding moves the logits by far more than bitsandbytes' own CPU kernels do (their bf16 / int8
rounding, ≤ 2e-2 on this one-layer model)."""


def dequantized_peft(fmt: str) -> torch.nn.Module:
    """PEFT's LoRA on the fp32 model whose linear weights are bitsandbytes' dequantization of ``fmt``."""
    import peft
    import transformers
    from test_quant_bnb import layers, library_dequant

    model = transformers.LlamaForCausalLM.from_pretrained(bnb_checkpoints.root() / "fp32")
    _, found = layers(bnb_checkpoints.root() / fmt)
    for prefix, (name, tensors) in found.items():
        model.get_submodule(prefix).weight.data = library_dequant(name, tensors).float()
    return peft.PeftModel.from_pretrained(model, bnb_checkpoints.adapter(fmt)).eval()


@pytest.fixture(scope="module")
def exact_nf4():
    with torch.no_grad():
        return dequantized_peft("nf4-dq")(input_ids=IDS).logits


def logits(model: qlora.QLoRAModel) -> torch.Tensor:
    with torch.no_grad():
        return model.module(input_ids=IDS).logits


class Int8Table(torch.nn.Module):
    """An embedding table stored int8 (``--quantize-embeddings``), as ``peftc::int8_embedding`` reads it, plus
    one stored fp16 (``int8-head``'s embedding, ``peftc::fp16_embedding``)."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.register_buffer("codes", torch.randint(-127, 128, (rows, width), dtype=torch.int8))
        self.register_buffer("scales", torch.rand(rows) + 0.5)
        self.register_buffer("table16", torch.randn(rows, width).half())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.peftc.int8_embedding(ids, self.codes, self.scales) + torch.ops.peftc.fp16_embedding(
            ids, self.table16
        )


def test_onnx_runs_matmulbnb4_and_matches_eager(tmp_path):
    """The quantized layers and the two-path sites (q_proj with fp16 factors: two-path-fp16) as onnxruntime
    runs them (a stack of the model's own layers behind int8 and fp16 embedding tables: the lowering of each
    op is what is checked; the whole model is lowered by benchmarks/qlora.py). q_proj requant-int8 is one
    ``com.microsoft.MatMulNBits`` (8 bits, blocks of 32, accuracy level 4) whose int8-activation kernel
    gives what the op's eager body computes (it rounds the activations as the kernel does; without that
    rounding the two differ by far more)."""
    import onnx

    from peftc.quant import policy
    from peftc.quant.modules import TwoPathLinear

    nf4 = qlora.build(bnb_checkpoints.root() / "nf4-dq", bnb_checkpoints.adapter("nf4-dq"), "two-path").module
    int8 = qlora.build(bnb_checkpoints.root() / "int8", bnb_checkpoints.adapter("int8"), "two-path").module
    attention, mlp = nf4.model.layers[0].self_attn, int8.model.layers[0].mlp
    table, q = Int8Table(64, 64), attention.q_proj
    q16 = TwoPathLinear(q.base, q.lora_A.half(), q.lora_B.half(), q.scale)
    q8 = policy.choose("q", q.base, q.lora_A, q.lora_B, q.scale, "requant-int8", None)[1]
    stack = torch.nn.Sequential(table, q16, attention.o_proj, mlp.up_proj, mlp.down_proj, q8)
    ids = torch.randint(0, 64, (2, 5))
    run = qlora.lower(stack, "onnx", tmp_path, parse_inputs(["input:batch,seq:int64"]))
    nodes = onnx.load(str(tmp_path / "model.onnx")).graph.node
    kinds = [n.op_type for n in nodes]
    assert kinds.count("MatMulBnb4") == 2 and kinds.count("Gather") == 3 + 2 and "GatherND" not in kinds  # + absmax
    (nbits,) = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits.domain == "com.microsoft" and {a.name: a.i for a in nbits.attribute} == {
        "K": 64, "N": 64, "bits": 8, "block_size": 32, "accuracy_level": 4
    }  # fmt: skip
    looked_up = table.codes[ids].float() * (table.scales[ids] / 127).unsqueeze(-1) + table.table16[ids].float()
    assert qlora.relative_error(table(ids), looked_up) < EXACT
    with torch.no_grad():
        expected = stack(ids)
        q8.accuracy_level = 0
        unrounded = stack(ids)
    assert qlora.relative_error(run({"input": ids}), expected) < EXACT
    assert qlora.relative_error(run({"input": ids}), unrounded) > 1e-3


def test_wrong_nibble_order_fails_verification(exact_nf4, monkeypatch):
    swapped = lambda p: torch.stack([p.flatten().long() & 0xF, p.flatten().long() >> 4], dim=1).flatten()  # noqa: E731
    monkeypatch.setattr(bnb, "unpack_nibbles", swapped)
    built = qlora.build(bnb_checkpoints.root() / "nf4-dq", bnb_checkpoints.adapter("nf4-dq"), "two-path")
    assert qlora.relative_error(logits(built), exact_nf4) > KERNEL


def test_unknown_policy_is_refused():
    with pytest.raises(InputError, match="--merge-policy 'fast'"):
        qlora.build(bnb_checkpoints.root() / "nf4", bnb_checkpoints.adapter("nf4-dq"), "fast")


def test_other_methods_refuse_a_quantized_layer_naming_it():
    import types
    from pathlib import Path

    from peftc.errors import UnsupportedError
    from peftc.ir.modules import ModuleInfo
    from peftc.methods.common import layout

    module = ModuleInfo("model.layers.0.self_attn.q_proj", "peftc.quant.modules.Bnb4Linear", {}, ())
    source = types.SimpleNamespace(config_path=Path("adapter_config.json"))
    with pytest.raises(
        UnsupportedError, match=r"IA3 on the quantized layer 'model\.layers\.0\.self_attn\.q_proj'.*LoRA"
    ):
        layout(source, module, "IA3", ["Linear"])


def test_fp4_policies_against_peft_and_bitsandbytes():
    """FP4 (no double quantization): two-path and float equal PEFT on bitsandbytes' dequantization of the
    checkpoint; requant's packed codes are what bitsandbytes' FP4 quantizer makes of PEFT's merged weight."""
    F = pytest.importorskip("bitsandbytes").functional
    reference = dequantized_peft("fp4")
    with torch.no_grad():
        exact = reference(input_ids=IDS).logits
    root, adapter = bnb_checkpoints.root() / "fp4", bnb_checkpoints.adapter("fp4")
    for merge_policy in ("two-path", "float"):
        assert qlora.relative_error(logits(qlora.build(root, adapter, merge_policy)), exact) < EXACT
    requant = qlora.build(root, adapter, "requant")
    assert [s.policy for s in requant.sites] == ["requant"] * 3 and all(s.error > 0 for s in requant.sites)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        lora = reference.base_model.model.get_submodule(module)
        merged = (lora.base_layer.weight + lora.get_delta_weight("default")).detach().float()
        packed, state = F.quantize_4bit(merged, blocksize=64, quant_type="fp4")
        layer = requant.module.get_submodule(module)
        assert layer.quant_type == "fp4" and torch.equal(layer.packed, packed.flatten())
        assert torch.equal(layer.absmax, state.absmax)
