"""onnxscript helpers shared by the ONNX translations of call-site ops (``SiteOp.onnx``).

A translation is an onnxscript-traced function of the op's arguments; ``torch.onnx.export`` calls it
with symbolic values whose ``dtype`` and ``shape`` are known, so casts are decided here, at export.
"""

from __future__ import annotations

from typing import Any

import onnx_ir
import torch
from onnxscript import opset18 as op

_TORCH = {
    onnx_ir.DataType.DOUBLE: torch.float64,
    onnx_ir.DataType.FLOAT: torch.float32,
    onnx_ir.DataType.FLOAT16: torch.float16,
    onnx_ir.DataType.BFLOAT16: torch.bfloat16,
}


def scalar(value: float, like: Any) -> Any:
    """A scalar constant of ``like``'s dtype."""
    return op.Cast(op.Constant(value_float=value), to=int(like.dtype))


def cast(value: Any, current: Any, target: Any) -> Any:
    """``value`` (of ``current``'s dtype) in ``target``'s dtype; no node when they already agree.

    ``Cast`` with the dtype known here, never ``CastLike``: onnxruntime cannot constant-fold
    ``CastLike`` (a function), which would leave a whole weight expression to run on every call.
    """
    return value if current.dtype == target.dtype else op.Cast(value, to=int(target.dtype))


def ints(*values: int) -> Any:
    """A constant ``int64`` vector."""
    return op.Constant(value_ints=list(values))


def add_promoted(y: Any, y_like: Any, h: Any, h_like: Any) -> Any:
    """``y + h`` in the dtype torch promotes the two to (fp16 and bf16 meet in fp32), cast back to ``y``'s:
    the eager ``(y + h).to(y.dtype)`` of a base output ``y`` and an adapter branch ``h``. The dtypes are
    read from ``y_like`` and ``h_like`` (graph inputs of the same dtypes: computed values carry none
    while the translation is traced)."""
    dtype = {v: k for k, v in _TORCH.items()}[torch.promote_types(_TORCH[y_like.dtype], _TORCH[h_like.dtype])]
    y_wide = y if y_like.dtype == dtype else op.Cast(y, to=int(dtype))
    total = op.Add(y_wide, h if h_like.dtype == dtype else op.Cast(h, to=int(dtype)))
    return total if y_like.dtype == dtype else op.Cast(total, to=int(y_like.dtype))
