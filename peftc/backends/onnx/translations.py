"""ONNX translations of the ``peftc::`` site ops (one per op), for ``torch.onnx.export``.

Each function mirrors its op's eager body in ``peftc/ops/``; ``tests/backends/test_onnx.py`` checks
them against it. Weights stay in their stored layout (a ``Transpose`` feeds ``MatMul``) so the
adapter initializers keep their peftc names; onnxruntime folds the transposes when it loads the model.
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import opset18 as op


def lora_linear(
    x: Any,
    weight: Any,
    bias: Any,
    lora_a: Any,
    lora_b: Any,
    lora_b_bias: Any,
    scale: float,
    fan_in_fan_out: bool,
) -> Any:
    """``x Wᵀ + b + s·((x Aᵀ) Bᵀ + b_B)``; ``x W + b`` for a ``[d_in, d_out]`` (Conv1D) weight."""
    y = op.MatMul(x, weight if fan_in_fan_out else op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)
    down = op.MatMul(op.CastLike(x, lora_a), op.Transpose(lora_a, perm=[1, 0]))
    down = op.Mul(down, op.CastLike(op.Constant(value_float=scale), down))
    up = op.MatMul(down, op.Transpose(lora_b, perm=[1, 0]))
    if lora_b_bias is not None:
        up = op.Add(up, op.Mul(lora_b_bias, op.CastLike(op.Constant(value_float=scale), lora_b_bias)))
    return op.Add(y, op.CastLike(up, y))


def table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``."""
    import peftc.ops  # noqa: F401  (registers the ops)

    return {torch.ops.peftc.lora_linear.default: lora_linear}
