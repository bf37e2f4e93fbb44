"""BEFT (bias tuning) as a weight transform (PEFT ``peft_type: "BEFT"``).

BEFT adds a trained vector ``v`` to a linear layer's output, ``y = x Wᵀ + b + v``, which folds exactly
into the bias: ``b' = b + v``.
"""

from __future__ import annotations

import torch

from peftc.ops.base import SiteOp, weight_op

BEFT_BIAS = SiteOp(name="beft_bias", form="weight", tensor_roles=("beft_bias",), scalars=())


@weight_op("beft_bias(Tensor bias, Tensor beft_bias) -> Tensor")
def beft_bias(bias: torch.Tensor, beft_bias: torch.Tensor) -> torch.Tensor:
    """``b + v`` (fp32, cast back to ``b``'s dtype)."""
    return (bias.to(torch.float32) + beft_bias.to(torch.float32).reshape(-1)).to(bias.dtype)
