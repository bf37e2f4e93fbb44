"""Quantized layers on the TensorRT target: refused before any export, naming the layer.

The ONNX backend lowers bitsandbytes 4-bit layers to ``com.microsoft.MatMulBnb4`` and GPTQ / AWQ /
``requant-int8`` layers to ``com.microsoft.MatMulNBits``, onnxruntime's contrib ops, which TensorRT's
parser does not read. TensorRT takes 4-bit weights only as a symmetric int4 ``DequantizeLinear``
(zero points 0, ``shared/FORMATS.md`` §4; ``peftc.quant.matmulnbits.symmetric`` makes such codes, and
tensorrt-rtx's parser accepts them: ``tests/quant/test_matmulnbits.py``), which NF4 codebooks and
asymmetric GPTQ/AWQ would reach only by a second rounding. So for this target a merged compile dequantizes
every 4-bit layer before export (``--merge-policy auto`` / ``float``: ``peftc/quant/merge.py``, error 0); what
is left here is what the user asked to keep packed (``two-path``, ``requant`` of NF4/FP4, ``requant-int8``,
``--no-merge``). LLM.int8 layers and the int8 / fp16 embedding tables lower to standard ops and pass.
"""

from __future__ import annotations

from peftc import ir
from peftc.errors import UnsupportedError


def _contrib_ops() -> dict[object, tuple[str, str]]:
    """The ``peftc::`` overloads lowered to onnxruntime contrib ops → (the layer's format, the contrib op)."""
    from peftc.quant import ops, sites

    bnb4 = ("bitsandbytes 4-bit", "MatMulBnb4")
    nbits = ("GPTQ/AWQ", "MatMulNBits")
    return {
        ops.BNB4_LINEAR.overload: bnb4,
        ops.BNB4DQ_LINEAR.overload: bnb4,
        sites.LORA_BNB4.overload: bnb4,
        sites.LORA_BNB4DQ.overload: bnb4,
        ops.NBITS_LINEAR.overload: nbits,
        sites.LORA_NBITS.overload: nbits,
        ops.BLOCKS_LINEAR.overload: ("requant-int8 (8-bit blocks)", "MatMulNBits"),
    }


def refuse_contrib_layers(program: ir.Program) -> None:
    """Raise when ``program`` holds a quantized layer the ONNX backend lowers to an onnxruntime contrib op.

    Raises:
        UnsupportedError: one line naming the first such layer, its op and how many there are.
    """
    contrib = _contrib_ops()
    found = [n for n in program.graph.nodes if n.op == "call_function" and n.target in contrib]
    if not found:
        return
    node = found[0]
    module = ir.meta.peftc_meta(node).get("module") or ir.meta.module_path(node) or node.name
    fmt, op = contrib[node.target]
    others = f" (and {len(found) - 1} more quantized layers)" if len(found) > 1 else ""
    raise UnsupportedError(
        f"--target trt: {module} is a {fmt} layer{others}, which onnxruntime runs as com.microsoft.{op}; "
        "TensorRT's parser cannot read it: compile merged with --merge-policy auto or float (4-bit layers "
        "dequantized), or use --target onnx or --target aoti"
    )
