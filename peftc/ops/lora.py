"""LoRA site ops and their reference math (``shared/methods.md`` §2.1).

For a linear module ``y = x Wᵀ + b`` LoRA adds a rank-r update::

    y = x Wᵀ + b + s · (x Aᵀ Bᵀ + b_B)        A ∈ R^{r×d_in}, B ∈ R^{d_out×r}
    s = α / r   (α / √r with rsLoRA; r and α per module from rank_pattern / alpha_pattern)

``b_B`` is ``lora_B.bias`` (``lora_bias=True``), usually absent. GPT-2's ``Conv1D`` stores the base
weight transposed (``[d_in, d_out]``, ``fan_in_fan_out``) while A and B keep the ``nn.Linear`` layout.

Merging is exact up to rounding: ``W' = W + s·B·A`` (transposed for ``fan_in_fan_out``) and
``b' = b + s·b_B``, computed in fp32 and cast back to the base dtype (PEFT upcasts the same way,
because fp16/bf16 products of two small factors lose most of their mantissa).

The eager body below computes the update on the activation side (``(x Aᵀ) Bᵀ``), while merging goes
through :func:`delta_weight`: two independent routes to the same numbers, which is what lets
verification catch a wrong merge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftc.ops.base import SiteOp

LORA_LINEAR = SiteOp(
    name="lora_linear",
    base_params=("weight", "bias"),
    tensor_roles=("lora_A", "lora_B", "lora_B_bias"),
    scalars=("scale", "fan_in_fan_out"),
)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """``α/r``, or ``α/√r`` for rsLoRA."""
    return float(alpha) / (r**0.5 if use_rslora else r)


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """``s·B·A`` in fp32, in the base weight's layout (``[d_out, d_in]``, or transposed)."""
    delta = (lora_b.to(torch.float32) @ lora_a.to(torch.float32)) * scale
    return delta.T if fan_in_fan_out else delta


@torch.library.custom_op("peftc::lora_linear", mutates_args=())
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
    """A linear (or ``Conv1D``) module with an unmerged LoRA update; see the module docstring."""
    y = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
    h = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b, lora_b_bias)
    return y + (h * scale).to(y.dtype)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, lora_b_bias, scale, fan_in_fan_out):
    return F.linear(x, weight.T if fan_in_fan_out else weight, bias)
