"""``--target trt`` on a quantized base: every 4-bit layer dequantized before export (``peftc/quant/merge.py``).

The tiny QLoRA model of ``tests/bnb_checkpoints.py`` (NF4 with double quantization, LoRA on q/v/down; its
build shared with ``tests/test_qlora_compile.py``) goes through the build mode ``--target trt`` makes
(``Merged(dequantize=True)``) and the TensorRT target's lowering: ONNX with standard ops only, which
TensorRT's own parser (tensorrt-rtx, on CPU) reads; the engine build needs a GPU and is not run here. The
ONNX is run by onnxruntime against PEFT on bitsandbytes' dequantization of the same weights (exact: every
site adds error 0, so this is stronger than the budget PEFT's QLoRA kernels get). A wrong nibble order in
the dequantization is caught on two hand-made NF4 layers (no second lowering); GPTQ/AWQ layers:
``tests/test_qlora_gptq_awq.py``; what stays refused: ``tests/backends/test_tensorrt.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftc.backends import LowerRequest
from peftc.backends.tensorrt import install as trt_install
from peftc.driver.modes import Merged
from peftc.quant import compiled, merge, qlora

pytest.importorskip("bitsandbytes")
EXACT = 1e-5  # fp32 against fp32: the same products summed in another order
LAYERS = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """The nf4-dq QLoRA model optimized for ``--target trt`` and lowered by the TensorRT target (no GPU: no
    engine), with PEFT's logits on the dequantized weights."""
    from test_qlora_compile import base_for, optimize

    from peftc.backends.tensorrt import TensorRTBackend

    if trt_install.find_module() is None:
        pytest.skip(f"TensorRT parser not installed ({trt_install.INSTALL_HINT})")
    built, exact, _ = base_for("nf4-dq")
    optimized, eager = optimize(built, Merged(dequantize=True))
    directory = tmp_path_factory.mktemp("trt-nf4")
    request = LowerRequest(optimized.program, built.loaded.signature.in_dtype(torch.float32), built.world.reference)
    info = TensorRTBackend().lower(request, directory, lambda message: None).info
    return built, exact, optimized, eager, info, directory / "model.onnx"


def test_onnx_has_no_contrib_op_and_the_parser_reads_it(lowered):
    import onnx

    _, _, optimized, _, info, onnx_file = lowered
    ops = {str(n.target) for n in optimized.program.graph.nodes if n.op == "call_function"}
    assert not {o for o in ops if o.startswith("peftc.")}  # no packed layer, no QLoRA site left
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    assert not [n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")]
    parse = info["tensorrt"]["parse"]
    assert parse["layer_types"]["MATRIX_MULTIPLY"] >= len(LAYERS) and [o["name"] for o in parse["outputs"]] == [
        "logits"
    ]


def test_onnxruntime_matches_peft_on_the_dequantized_weights(lowered):
    import onnxruntime

    _, exact, _, eager, _, onnx_file = lowered
    from test_qlora_compile import IDS

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones_like(IDS.numpy())}
    out = torch.from_numpy(session.run(["logits"], {i.name: feeds[i.name] for i in session.get_inputs()})[0])
    assert qlora.relative_error(out, exact) < EXACT and qlora.relative_error(eager, exact) < EXACT


def test_the_table_has_every_layer_float_with_error_zero(lowered):
    rows = lowered[2].state
    by_module = {r["module"]: r for r in rows}
    assert sorted(by_module) == sorted(LAYERS)
    assert all(r["policy"] == "float" and r["error"] == 0.0 and r["format"] == "nf4" for r in rows)
    assert by_module["model.layers.0.mlp.down_proj"]["bytes"] == 64 * 128 * 4  # fp32
    assert by_module["model.layers.0.self_attn.q_proj"]["reason"].startswith("--target trt")
    assert by_module["model.layers.0.self_attn.k_proj"]["reason"].startswith("not adapted")
    assert "not adapted; --target trt" in compiled.table(rows)  # what peftc inspect prints
    # what makes a compile without any QLoRA site (a LoRA on the float head only) dequantize too
    assert compiled.has_packed(lowered[0].world.reference) and not compiled.has_packed(lowered[2].program)


def test_a_wrong_nibble_order_is_caught():
    """NF4 layers without LoRA, dequantized by ``merge-quantized`` for TensorRT, against the layers run eagerly:
    exact; decoded high nibble second, far off."""
    from peftc import ir
    from peftc.loaders.inputs import parse_inputs
    from peftc.passes.base import PassContext
    from peftc.quant import bnb
    from peftc.quant.modules import Bnb4Linear

    torch.manual_seed(0)
    layers = []
    for shape in ((32, 64), (64, 32)):
        packed, absmax = bnb.quantize_4bit(torch.randn(shape), "nf4", 64)
        layers.append(Bnb4Linear(packed, absmax, bnb.code_table("nf4"), 64, "nf4", shape, torch.randn(shape[0])))
    stack = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    signature = parse_inputs(["x:batch,64:float32"])
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = stack(x)

    def error() -> float:
        program = ir.trace(Call(stack), signature.example(signature.trace_sizes()), signature.dynamic_shapes())
        program = merge.MergeQuantizedPass(dequantize=True).run(program, PassContext()).program
        assert not any("peftc" in str(n.target) for n in program.graph.nodes if n.op == "call_function")
        with torch.no_grad():
            return qlora.relative_error(program.module()(x=x), expected)

    assert error() < EXACT
    right = merge.dequantized

    def swapped(op, values):
        packed = values[1]
        return right(op, [values[0], (packed >> 4) | ((packed & 0xF) << 4), *values[2:]])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(merge, "dequantized", swapped)
        assert error() > 0.1


class Call(torch.nn.Module):
    """``module`` with an input called ``x`` (fx renames one called ``input``, as ``nn.Sequential``'s is)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_the_driver_and_the_pass_name_the_same_packed_layers():
    """``compiled.PACKED_OPS`` (by name: the driver imports no torch) and ``merge.DEQUANTIZED`` list the same
    4-bit layer ops, and every 4-bit layer op of ``peftc/quant/ops.py`` is among them."""
    from peftc.quant import ops

    names = {op.name for op in merge.DEQUANTIZED}
    assert names == set(compiled.PACKED_OPS)
    unpacked = {"int8_linear", "blocks_linear", "int8_embedding", "fp16_embedding"}  # standard ops, or requant-int8
    assert {op.name for op in ops.OPS} - names == unpacked
