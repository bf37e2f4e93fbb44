"""onnxscript helpers shared by the ONNX translations of call-site ops (``SiteOp.onnx``).

A translation is an onnxscript-traced function of the op's arguments; ``torch.onnx.export`` calls it
with symbolic values whose ``dtype`` and ``shape`` are known, so casts are decided here, at export.
"""

from __future__ import annotations

from typing import Any

from onnxscript import opset18 as op


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
