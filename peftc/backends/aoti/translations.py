"""ATen bodies of the ``peftc::`` call-site ops, for AOTInductor (one per op, like ONNX's table).

Weight-site ops are ``CompositeImplicitAutograd`` and decompose by themselves; ``lora_linear`` is an
opaque ``custom_op`` (one node in peftc's IR), so it gets an explicit body here that
``ExportedProgram.run_decompositions`` traces into ATen ops Inductor can fuse. It mirrors the eager
body in ``peftc/ops/lora.py``; ``tests/backends/test_aoti.py`` checks them against each other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_b_bias: torch.Tensor | None,
    scale: float,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """``x Wᵀ + b + s·((x Aᵀ) Bᵀ + b_B)``, the LoRA branch in the adapter's dtype (PEFT's order of casts)."""
    y = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
    h = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b, lora_b_bias)
    return y + (h * scale).to(y.dtype)


def table() -> dict[Any, Any]:
    """Decomposition table for ``run_decompositions``."""
    import peftc.ops  # noqa: F401  (registers the ops)

    return {torch.ops.peftc.lora_linear.default: lora_linear}
