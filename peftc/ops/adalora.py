"""AdaLoRA as a weight transform (``shared/methods.md`` §2.6; PEFT ``peft_type: "ADALORA"``).

AdaLoRA trains an SVD-shaped update ``ΔW = P Λ Q``: ``A`` (``[r, d_in]``, Q), ``B`` (``[d_out, r]``, P)
and the singular values ``E`` (``[r, 1]``, Λ) whose pruned entries were dropped before saving. PEFT
scales it by ``α / (ranknum + 1e-5)``, where ``ranknum`` is the *initial* rank ``init_r`` even after
pruning — the division, and its ``1e-5``, are part of the trained model::

    W' = W + (B · (A ⊙ E)) · α / (ranknum + 1e-5)

``ΔW`` is ``[d_out, d_in]``: transposed for a Conv1D (``fan_in_fan_out``), reshaped to the kernel for a
convolution, whose ``A`` is ``[r, d_in·k_h·k_w]``.
"""

from __future__ import annotations

import numpy as np
import torch

from peftc.ops.base import SiteOp, from_out_in, weight_op

ADALORA_WEIGHT = SiteOp(
    name="adalora_weight",
    form="weight",
    tensor_roles=("lora_A", "lora_B", "lora_E"),
    scalars=("scale", "ranknum", "layout"),
)


def delta_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_e: torch.Tensor,
    scale: float,
    ranknum: float,
    layout: str,
) -> torch.Tensor:
    """``ΔW`` in fp32, shaped like ``weight``, in PEFT's order of operations."""
    a, b, e = (t.to(torch.float32) for t in (lora_a, lora_b, lora_e))
    delta = from_out_in(b @ (a * e), weight, layout)
    # PEFT adds 1e-5 to a float32 tensor: the divisor is rounded to float32 after the addition.
    divisor = float(np.float32(ranknum) + np.float32(1e-5))
    return delta * scale / divisor


@weight_op(
    "adalora_weight(Tensor weight, Tensor lora_a, Tensor lora_b, Tensor lora_e, float scale, float ranknum, "
    "str layout) -> Tensor"
)
def adalora_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_e: torch.Tensor,
    scale: float,
    ranknum: float,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` (fp32, cast back to ``W``'s dtype); see the module docstring."""
    delta = delta_weight(weight, lora_a, lora_b, lora_e, scale, ranknum, layout)
    return (weight.to(torch.float32) + delta).to(weight.dtype)
