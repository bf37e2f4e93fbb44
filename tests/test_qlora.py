"""QLoRA: a LoRA adapter on a bitsandbytes base, under each merge policy, against PEFT's own models.

Two oracles: PEFT's eager QLoRA model (bitsandbytes kernels: on this CPU the 4-bit GEMM rounds to bf16,
the int8 one quantizes activations per row, so it differs from any fp32 computation by that rounding),
and PEFT on an fp32 model whose weights are bitsandbytes' own dequantization of the checkpoint (the
exact reference of the unmerged QLoRA model). Quantization error and compile error are checked apart.
"""

from __future__ import annotations

import bnb_checkpoints
import pytest
import torch

from peftc.errors import InputError
from peftc.loaders.inputs import parse_inputs
from peftc.quant import bnb, policy, qlora

bitsandbytes = pytest.importorskip("bitsandbytes")
F = bitsandbytes.functional
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
EXACT = 1e-5  # fp32 against fp32: the same products summed in another order
KERNEL = 2e-2
"""PEFT's eager QLoRA on CPU: bitsandbytes rounds the 4-bit GEMM to bf16 (ε = 2⁻⁷ ≈ 7.8e-3) and the
int8 GEMM's activations to 1/127 of their row maximum; one decoder layer and the head, two roundings deep."""


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
def oracles():
    out = {}
    with torch.no_grad():
        for fmt in ("nf4-dq", "int8"):
            exact = dequantized_peft(fmt)
            with exact.disable_adapter():
                base = exact(input_ids=IDS).logits
            out[fmt] = (exact(input_ids=IDS).logits, bnb_checkpoints.peft_qlora(fmt)(input_ids=IDS).logits, base, exact)
    return out


def logits(model: qlora.QLoRAModel) -> torch.Tensor:
    with torch.no_grad():
        return model.module(input_ids=IDS).logits


@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
@pytest.mark.parametrize("merge_policy", ["float", "two-path"])
def test_exact_policies_match_peft(oracles, fmt, merge_policy):
    exact, eager, base, _ = oracles[fmt]
    assert qlora.relative_error(exact, base) > 0.05  # the adapter really changes the output
    built = qlora.build(bnb_checkpoints.root() / fmt, bnb_checkpoints.adapter(fmt), merge_policy)
    assert [s.policy for s in built.sites] == [merge_policy] * 3 and all(s.error == 0 for s in built.sites)
    out = logits(built)
    assert qlora.relative_error(out, exact) < EXACT
    assert qlora.relative_error(out, eager) < KERNEL


@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
def test_requant_is_bitsandbytes_requantization(oracles, fmt):
    """Each site's requantized weight is what bitsandbytes makes of PEFT's merged weight, and its
    reported error is that weight's error; the model moves by about that much."""
    exact, _, _, reference = oracles[fmt]
    built = qlora.build(bnb_checkpoints.root() / fmt, bnb_checkpoints.adapter(fmt), "requant")
    for site in built.sites:
        lora = reference.base_model.model.get_submodule(site.module)
        merged = (lora.base_layer.weight.float() + lora.get_delta_weight("default").float()).detach()
        ours = built.module.get_submodule(site.module)
        if fmt == "int8":
            codes, scales, _ = F.int8_vectorwise_quant(merged.clone())
            assert torch.equal(ours.weight_int8, codes) and torch.equal(ours.scb, scales)
            back = F.int8_vectorwise_dequant(codes, scales)
        else:
            packed, state = F.quantize_4bit(merged, blocksize=64, quant_type="nf4")
            assert torch.equal(ours.packed, packed.flatten()) and torch.equal(ours.absmax, state.absmax)
            back = F.dequantize_4bit(packed, state)
        expected = float(torch.linalg.norm(back - merged) / torch.linalg.norm(merged))
        assert site.error == pytest.approx(expected, rel=1e-5)
    moved = qlora.relative_error(logits(built), exact)
    assert 1e-4 < moved < 10 * max(s.error for s in built.sites)


def test_auto_chooses_per_site_under_the_budget():
    nf4 = qlora.build(bnb_checkpoints.root() / "nf4-dq", bnb_checkpoints.adapter("nf4-dq"), "auto", 1e-2)
    assert [s.policy for s in nf4.sites] == ["two-path"] * 3  # NF4 requantization adds ~9 %
    loose = qlora.build(bnb_checkpoints.root() / "nf4-dq", bnb_checkpoints.adapter("nf4-dq"), "auto", 0.5)
    assert [s.policy for s in loose.sites] == ["requant"] * 3 and loose.weight_bytes() < nf4.weight_bytes()
    int8 = qlora.build(bnb_checkpoints.root() / "int8", bnb_checkpoints.adapter("int8"), "auto", 1e-2)
    assert all(s.policy == "requant" and s.error <= 1e-2 for s in int8.sites)
    assert "requant" in policy.table(int8.sites) and "two-path" in policy.table(nf4.sites)


def test_onnx_runs_matmulbnb4_and_matches_eager(tmp_path):
    """The quantized layers as onnxruntime runs them (a stack of the model's own layers: the lowering of
    each op is what is checked; the whole model is lowered by benchmarks/qlora.py)."""
    import onnx

    nf4 = qlora.build(bnb_checkpoints.root() / "nf4-dq", bnb_checkpoints.adapter("nf4-dq"), "two-path").module
    int8 = qlora.build(bnb_checkpoints.root() / "int8", bnb_checkpoints.adapter("int8"), "two-path").module
    attention, mlp = nf4.model.layers[0].self_attn, int8.model.layers[0].mlp
    stack = torch.nn.Sequential(attention.q_proj, attention.o_proj, mlp.up_proj, mlp.down_proj)
    x = torch.randn(2, 5, 64)
    run = qlora.lower(stack, "onnx", tmp_path, parse_inputs(["input:batch,seq,64:float32"]))
    kinds = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert kinds.count("MatMulBnb4") == 2
    with torch.no_grad():
        expected = stack(x)
    assert qlora.relative_error(run({"input": x}), expected) < EXACT


def test_wrong_nibble_order_fails_verification(oracles, monkeypatch):
    swapped = lambda p: torch.stack([p.flatten().long() & 0xF, p.flatten().long() >> 4], dim=1).flatten()  # noqa: E731
    monkeypatch.setattr(bnb, "unpack_nibbles", swapped)
    built = qlora.build(bnb_checkpoints.root() / "nf4-dq", bnb_checkpoints.adapter("nf4-dq"), "two-path")
    assert qlora.relative_error(logits(built), oracles["nf4-dq"][0]) > KERNEL


def test_unknown_policy_is_refused():
    with pytest.raises(InputError, match="--merge-policy 'fast'"):
        qlora.build(bnb_checkpoints.root() / "nf4", bnb_checkpoints.adapter("nf4-dq"), "fast")


def test_cli_compiles_checks_and_inspects(tmp_path, capsys, monkeypatch):
    """The command's plumbing; the lowering itself is checked above (an ONNX export of the whole model
    costs tens of seconds), so here it is the eager model written to a file."""
    from peftc.cli import main
    from peftc.quant import cli

    assert cli.POLICIES == policy.POLICIES

    def lower(module, target, directory, signature=None):
        (directory / "model.onnx").write_bytes(b"stand-in")
        return lambda feeds: module(**feeds).logits

    monkeypatch.setattr(qlora, "lower", lower)
    out = tmp_path / "out"
    args = ["qlora", str(bnb_checkpoints.root() / "int8"), "--adapter", str(bnb_checkpoints.adapter("int8"))]
    assert main([*args, "-o", str(out), "--merge-policy", "auto", "--max-error", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "compile error (artifact vs peftc eager): 0" in printed
    oracle = float(printed.split("PEFT eager QLoRA): ")[1].split()[0])
    assert 1e-4 < oracle < KERNEL + 1e-2  # int8 activation rounding plus requantization within the budget
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("requant") == 3 and "model.layers.0.mlp.down_proj" in shown
    assert main([*args, "-o", str(out)]) == 2  # exists, no --force
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_compile_refuses_a_quantized_layer_naming_the_way():
    import types
    from pathlib import Path

    from peftc.errors import UnsupportedError
    from peftc.ir.modules import ModuleInfo
    from peftc.methods.common import layout

    module = ModuleInfo("model.layers.0.self_attn.q_proj", "peftc.quant.modules.Bnb4Linear", {}, ())
    source = types.SimpleNamespace(config_path=Path("adapter_config.json"))
    with pytest.raises(UnsupportedError, match=r"quantized layer 'model\.layers\.0\.self_attn\.q_proj'.*peftc qlora"):
        layout(source, module, "LoRA", ["Linear"])
