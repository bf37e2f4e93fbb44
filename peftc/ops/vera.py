"""VeRA as a weight transform (PEFT ``peft_type: "VERA"``).

VeRA trains two vectors per module and shares two frozen random projections across all of them:
``A`` ``[r, d_in_max]`` and ``B`` ``[d_out_max, r]``, sized for the largest adapted module. A module
with ``d_in`` inputs and ``d_out`` outputs uses their leading slices::

    y = x Wᵀ + b + λ_b ⊙ (B[:d_out] (λ_d ⊙ (A[:, :d_in] x)))
    ⇔  W' = W + ΔW,   ΔW = (λ_b ⊙ B[:d_out]) · (λ_d ⊙ A[:, :d_in])     (λ_b scales rows, λ_d scales the r axis)

There is no α/r scale. GPT-2's ``Conv1D`` stores ``W`` as ``[d_in, d_out]`` (``fan_in_fan_out``), so
``ΔW`` is added transposed. The update is formed in fp32 and cast back to ``W``'s dtype.
"""

from __future__ import annotations

import torch

from peftc.ops.base import SiteOp, weight_op

VERA_WEIGHT = SiteOp(
    name="vera_weight",
    form="weight",
    tensor_roles=("vera_A", "vera_B", "vera_lambda_b", "vera_lambda_d"),
    scalars=("layout",),
)


def delta_weight(
    vera_a: torch.Tensor,
    vera_b: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    d_out: int,
    d_in: int,
) -> torch.Tensor:
    """``(λ_b ⊙ B[:d_out]) · (λ_d ⊙ A[:, :d_in])`` in fp32, ``[d_out, d_in]``."""
    a = vera_a.to(torch.float32)[:, :d_in] * lambda_d.to(torch.float32)[:, None]
    b = vera_b.to(torch.float32)[:d_out] * lambda_b.to(torch.float32)[:, None]
    return b @ a


@weight_op(
    "vera_weight(Tensor weight, Tensor vera_a, Tensor vera_b, Tensor lambda_b, Tensor lambda_d, str layout) -> Tensor"
)
def vera_weight(
    weight: torch.Tensor,
    vera_a: torch.Tensor,
    vera_b: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    transposed = layout == "linear_t"
    d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
    delta = delta_weight(vera_a, vera_b, lambda_b, lambda_d, d_out, d_in)
    return (weight.to(torch.float32) + (delta.T if transposed else delta)).to(weight.dtype)
