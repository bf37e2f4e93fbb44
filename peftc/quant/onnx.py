"""ONNX translations of the quantized-linear ops (``peftc/quant/ops.py``) for ``torch.onnx.export``.

``MatMulBnb4`` (domain ``com.microsoft``, onnxruntime CPU): attributes ``K`` (in), ``N`` (out),
``block_size``, ``quant_type`` (0 FP4, 1 NF4); inputs ``A`` (fp32/fp16), ``B`` the uint8 packing of the
row-major ``[N, K]`` weight (high nibble first, exactly bitsandbytes' bytes), ``absmax`` one scale per
block, in ``A``'s dtype. Its code tables are bitsandbytes' own (the loader refuses a checkpoint whose
``quant_map`` differs).
"""

from __future__ import annotations

from typing import Any

import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from peftc.backends.onnx.script import cast, scalar
from peftc.quant.bnb import INT8_SCALE

MSFT = onnxscript.values.Opset("com.microsoft", 1)
_FLOATS = ["tensor(float)", "tensor(float16)"]
MATMUL_BNB4 = onnxscript.values.Op(
    MSFT,
    "MatMulBnb4",
    OpSchema(
        "MatMulBnb4", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("absmax", "T1")],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", _FLOATS, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("K", "N", "block_size", "quant_type")],
    ),
)  # fmt: skip
"""onnxruntime's contrib op, described here (onnx has no schema for it)."""


def bnb4_linear(
    x: Any,
    packed: Any,
    absmax: Any,
    code: Any,
    bias: Any,
    blocksize: int,
    quant_type: int,
    out_features: int,
    in_features: int,
) -> Any:
    """``MatMulBnb4(x, packed, absmax) + b``."""
    flat = op.Reshape(packed, op.Constant(value_ints=[-1]))
    y = MATMUL_BNB4(
        x, flat, cast(absmax, absmax, x), K=in_features, N=out_features, block_size=blocksize, quant_type=quant_type
    )
    return y if bias is None else op.Add(y, cast(bias, bias, x))


def int8_linear(x: Any, weight: Any, scb: Any, bias: Any) -> Any:
    """``x · (CB · SCB / 127)ᵀ + b``, dequantized in the graph (folded by onnxruntime at load time)."""
    dense = op.Mul(
        op.Mul(op.Cast(weight, to=1), op.Unsqueeze(scb, op.Constant(value_ints=[1]))), scalar(INT8_SCALE, scb)
    )
    y = op.MatMul(x, cast(op.Transpose(dense, perm=[1, 0]), dense, x))
    return y if bias is None else op.Add(y, cast(bias, bias, x))
