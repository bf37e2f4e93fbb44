"""GPTQ and AWQ GEMM bases end to end: loaded packed (``peftc::nbits_linear``), ONNX as
``com.microsoft.MatMulNBits``, and a PEFT LoRA on them under the exact merge policies.

PEFT cannot run GPTQ/AWQ kernels here (no auto-gptq / autoawq / gptqmodel on this torch), so the oracle is
PEFT on the fp32 model whose weights are exactly the dequantized ones, from the test packer's own codes
(``tests/quant_packing.py``); it is also the reference of peftc's eager model on the dequantized base.
"""

from __future__ import annotations

import shutil

import nbits_checkpoints
import pytest
import safetensors.torch
import torch
from cli_run import error_line

from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.quant import formats, gptq, qlora

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
EXACT = 1e-5  # fp32 against fp32: the same products summed in another order
FORMATS = ("gptq", "awq")


@pytest.fixture(scope="module")
def oracles():
    out = {}
    with torch.no_grad():
        for fmt in FORMATS:
            model = nbits_checkpoints.peft_on_float(fmt)
            with model.disable_adapter():
                base = model(input_ids=IDS).logits
            out[fmt] = (model(input_ids=IDS).logits, base)
    return out


def logits(module: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=IDS).logits


@pytest.fixture(scope="module")
def two_path():
    return {fmt: qlora.build(nbits_checkpoints.root() / fmt, nbits_checkpoints.root() / f"lora-{fmt}", "two-path")
            for fmt in FORMATS}  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_path_matches_peft(oracles, two_path, fmt):
    exact, base = oracles[fmt]
    assert qlora.relative_error(exact, base) > 0.05  # the adapter really changes the output
    built = two_path[fmt]
    assert [s.policy for s in built.sites] == ["two-path"] * 3 and all(s.error == 0 for s in built.sites)
    assert qlora.relative_error(logits(built.module), exact) < EXACT


def test_gptq_through_the_driver_float_and_two_path(oracles):
    """``peftc compile``'s stages on a GPTQ base: the LoRA as ``lora_nbits`` sites, merged in float or kept."""
    from peftc.driver.build import Stages, build
    from peftc.driver.modes import Merged
    from peftc.driver.sources import Sources
    from peftc.passes.base import PassContext

    root = nbits_checkpoints.root()
    built = build(Sources(str(root / "gptq"), (str(root / "lora-gptq"),), task="none"), Stages(None), stack=True)
    feeds = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    for merge_policy, site_ops in (("two-path", 3), ("float", 0)):
        program = Merged(merge_policy=merge_policy).optimize(built, PassContext()).program
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert targets.count("peftc.lora_nbits.default") == site_ops
        assert targets.count("peftc.nbits_linear.default") == 4  # the layers the adapter leaves
        with torch.no_grad():
            out = program.module()(**feeds)["logits"]
        assert qlora.relative_error(out, oracles["gptq"][0]) < EXACT
    with pytest.raises(UnsupportedError, match=r"--merge-policy requant on a GPTQ base"):
        Merged(merge_policy="requant").optimize(built, PassContext())


def test_requant_is_refused_and_auto_keeps_two_path(two_path):
    root = nbits_checkpoints.root()
    with pytest.raises(UnsupportedError, match=r"down_proj: --merge-policy requant on a GPTQ base"):
        qlora.build(root / "gptq", root / "lora-gptq", "requant")
    auto = qlora.build(root / "awq", root / "lora-awq", "auto", 0.5)
    assert [s.policy for s in auto.sites] == ["two-path-fp16"] * 3  # the factors stored fp16: within 0.5
    assert "no requant for GPTQ/AWQ" in auto.sites[0].reason


def test_ir_keeps_the_weights_packed_and_onnx_runs_matmulnbits(two_path, tmp_path):
    """The GPTQ and AWQ layers (one with a LoRA branch each) in the IR, decomposed for AOTInductor, and as
    onnxruntime runs them (a stack of the model's own layers: the lowering of each op is what is checked)."""
    import onnx

    from peftc import ir

    gptq_attn, awq_mlp = two_path["gptq"].module.model.layers[0].self_attn, two_path["awq"].module.model.layers[0].mlp
    stack = torch.nn.Sequential(gptq_attn.q_proj, gptq_attn.o_proj, awq_mlp.up_proj, awq_mlp.down_proj)
    x = torch.randn(2, 5, 64)
    signature = parse_inputs(["input:batch,seq,64:float32"])
    program = ir.trace(stack, signature.example(signature.trace_sizes()), signature.dynamic_shapes())
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("peftc.nbits_linear.default") == 2 and targets.count("peftc.lora_nbits.default") == 2
    buffers = dict(program.named_buffers())
    assert buffers["0.base.qweight"].dtype == torch.int32 and buffers["2.qzeros"].dtype == torch.int32
    from peftc.backends.aoti import decompositions  # AOTInductor lowers the decomposed program

    decomposed = program.run_decompositions(decompositions())
    assert not any("peftc" in str(n.target) for n in decomposed.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        assert qlora.relative_error(decomposed.module()(input=x), stack(x)) < EXACT
    run = qlora.lower(stack, "onnx", tmp_path, signature)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    kinds = [n.op_type for n in graph.node]
    assert kinds.count("MatMulNBits") == 4 and not any(n.domain == "peftc.pending" for n in graph.node)
    assert not any(i.name.endswith("qweight") for i in graph.initializer)  # repacked, not stored twice
    with torch.no_grad():
        expected = stack(x)
    assert qlora.relative_error(run({"input": x}), expected) < EXACT


def test_trt_dequantizes_gptq_and_awq_layers(two_path):
    """``--target trt`` (``merge-quantized`` with ``dequantize``): a GPTQ site merged in float, GPTQ and AWQ
    layers without LoRA as float ``aten.linear``, each a table row; the program computes what the layers do."""
    from peftc import ir
    from peftc.passes.base import PassContext
    from peftc.quant.merge import MergeQuantizedPass

    gptq_attn, awq_mlp = two_path["gptq"].module.model.layers[0].self_attn, two_path["awq"].module.model.layers[0].mlp

    class Stack(torch.nn.Module):  # forward(x): fx renames an input called ``input``
        def __init__(self):
            super().__init__()
            self.q, self.up = gptq_attn.q_proj, awq_mlp.up_proj

        def forward(self, x):
            return self.up(self.q(x))

    stack = Stack()
    x = torch.randn(2, 5, 64)
    signature = parse_inputs(["x:batch,seq,64:float32"])
    program = ir.trace(stack, signature.example(signature.trace_sizes()), signature.dynamic_shapes())
    made = MergeQuantizedPass("auto", dequantize=True)
    program = made.run(program, PassContext()).program
    assert not any("peftc" in str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert [(r["format"], r["policy"], r["error"], r["bytes"]) for r in made.sites] == [
        ("gptq", "float", 0.0, 64 * 64 * 4), ("awq", "float", 0.0, 128 * 64 * 4)]  # fmt: skip
    assert made.sites[0]["reason"].startswith("--target trt") and made.sites[1]["module"] == "up"
    with torch.no_grad():
        assert qlora.relative_error(program.module()(x=x), stack(x)) < EXACT


def test_missing_plus_one_on_v1_zeros_fails_verification(oracles, monkeypatch):
    decode = gptq.decode
    monkeypatch.setattr(gptq, "decode", lambda qw, qz, s, g, bits, version: decode(qw, qz, s, g, bits, 2))
    root = nbits_checkpoints.root()
    built = qlora.build(root / "gptq", root / "lora-gptq", "two-path")
    assert qlora.relative_error(logits(built.module), oracles["gptq"][0]) > 1e-2


def test_options_peftc_does_not_read_are_refused():
    with pytest.raises(UnsupportedError, match="quantization_config.use_marlin"):
        formats.check_config({**nbits_checkpoints.CONFIGS["gptq"], "use_marlin": True})
    with pytest.raises(UnsupportedError, match=r"quantization_config.version = 'gemv'"):
        formats.check_config({**nbits_checkpoints.CONFIGS["awq"], "version": "gemv"})


def test_configs_as_transformers_writes_them_are_read():
    """The ``quantization_config`` dicts transformers' own ``GPTQConfig`` / ``AwqConfig`` write (AwqConfig
    inherits GPTQ's calibration fields, ``sym: true`` and ``desc_act`` among them, and writes ``format`` beside
    ``version``) are read; their GEMV layout is refused by either field's name."""
    import transformers

    from peftc.quant import awq

    assert formats.check_config(transformers.GPTQConfig(bits=4, group_size=32).to_dict()) == "gptq"
    written = transformers.AwqConfig(bits=4, group_size=32).to_dict()
    assert written["sym"] is True and written["format"] == written["version"] == "gemm"
    assert formats.check_config(written) == "awq"
    state = safetensors.torch.load_file(str(nbits_checkpoints.root() / "awq" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    layer = {name: state[f"{key}.{name}"] for name in ("qweight", "qzeros", "scales")}
    assert torch.equal(
        awq.dequantize(layer, written, key), awq.dequantize(layer, nbits_checkpoints.CONFIGS["awq"], key)
    )
    gemv = transformers.AwqConfig(bits=4, version="gemv").to_dict()
    with pytest.raises(UnsupportedError, match=r"quantization_config\.version = 'gemv'"):
        formats.check_config(gemv)
    with pytest.raises(UnsupportedError, match=r"q_proj: quantization_config\.format = 'gemv'"):
        awq.dequantize(layer, {**nbits_checkpoints.CONFIGS["awq"], "format": "gemv"}, key)


def test_qweight_of_wrong_length_is_one_line_naming_the_key(tmp_path, capsys):
    from peftc.cli import main

    root = nbits_checkpoints.root()
    bad = tmp_path / "gptq"
    shutil.copytree(root / "gptq", bad)
    state = safetensors.torch.load_file(str(bad / "model.safetensors"))
    key = "model.layers.0.self_attn.v_proj.qweight"
    state[key] = state[key][:-1].contiguous()
    safetensors.torch.save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(InputError, match=rf"{key}: shape \[7, 32\], expected \[8, 32\]"):
        qlora.build(bad, root / "lora-gptq", "two-path")
    assert main(["compile", str(bad), "--adapter", str(root / "lora-gptq"), "-o", str(tmp_path / "out")]) == 2
    assert key in error_line(capsys.readouterr().err)


def test_act_order_gptq_is_refused_by_the_onnx_lowering_naming_the_layer(two_path, tmp_path):
    """MatMulNBits blocks are contiguous in K, act-order groups are not: one error naming ``g_idx``."""
    from peftc.quant.modules import NBitsLinear

    q = two_path["gptq"].module.model.layers[0].self_attn.o_proj
    packed = {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales, "g_idx": q.g_idx.flip(0)}
    layer = torch.nn.Sequential(NBitsLinear("gptq", 4, 1, 32, packed, (64, 64), None))
    with pytest.raises(UnsupportedError, match=r"^0\.g_idx: act-order groups are not contiguous in K") as caught:
        qlora.lower(layer, "onnx", tmp_path, parse_inputs(["input:batch,64:float32"]))
    assert "\n" not in str(caught.value)
