"""DoRA as a weight transform (``shared/methods.md`` §3.1; PEFT ``use_dora=True``).

    W' = f ⊙ (W + ΔW),   f = m / ‖W + ΔW‖,   ΔW = s·B·A (LoRA's update in the parameter's layout)

The norm is taken per output channel of the adapted weight: rows of an ``nn.Linear`` ``[d_out, d_in]``,
columns of a Conv1D ``[d_in, d_out]``, all but the first axis of a convolution kernel, and — for
embeddings — per embedding dimension over the vocabulary (columns of ``[num, dim]``). ``m`` is the
trained magnitude vector (``(d_out,)``; ``(1, d_out, 1, …)`` for convolutions; ``(dim,)`` for
embeddings). The bias is never scaled.

Two ops: ``dora_weight`` is the reference (it computes the norm from ``W``, as PEFT does on every
call); ``dora_factored_weight`` takes ``f`` precomputed at compile time (the ``factor-dora`` pass),
so an unmerged artifact keeps ``W``, ``A``, ``B`` and ``f`` apart and never recomputes a norm: the
remaining expression ``f ⊙ (W + s·B·A)`` is weight-only and onnxruntime folds it at load.
"""

from __future__ import annotations

import torch

from peftc.methods.lora.ops import delta_weight
from peftc.ops import SiteOp, composite_op

DORA_WEIGHT = SiteOp(
    name="dora_weight", form="weight", tensor_roles=("lora_A", "lora_B", "magnitude"), scalars=("scale", "layout")
)
DORA_FACTORED_WEIGHT = SiteOp(
    name="dora_factored_weight", form="weight", tensor_roles=("lora_A", "lora_B", "factor"), scalars=("scale", "layout")
)


def _broadcast(vector: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """A per-output-channel vector shaped to multiply a weight of ``layout``."""
    vector = vector.reshape(-1)
    if layout in ("linear_t", "embedding"):
        return vector[None, :]
    return vector.reshape(-1, *([1] * (like.dim() - 1)))


def factor(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, layout: str
) -> torch.Tensor:
    """``f = m / ‖W + s·B·A‖`` per output channel, in fp32, as a flat vector."""
    adapted = weight.to(torch.float32) + delta_weight(lora_a, lora_b, scale, layout)
    if layout in ("linear_t", "embedding"):
        norm = adapted.norm(dim=0)
    else:
        norm = adapted.flatten(1).norm(dim=1)
    return magnitude.to(torch.float32).reshape(-1) / norm


@composite_op(
    "dora_weight(Tensor weight, Tensor lora_a, Tensor lora_b, Tensor magnitude, float scale, str layout) -> Tensor"
)
def dora_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, layout: str
) -> torch.Tensor:
    """``m/‖W + s·B·A‖ ⊙ (W + s·B·A)`` in fp32, cast back to ``W``'s dtype."""
    f = factor(weight, lora_a, lora_b, magnitude, scale, layout)
    return dora_factored_weight(weight, lora_a, lora_b, f, scale, layout)


@composite_op(
    "dora_factored_weight(Tensor weight, Tensor lora_a, Tensor lora_b, Tensor factor, float scale, str layout) -> Tensor"
)
def dora_factored_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, factor: torch.Tensor, scale: float, layout: str
) -> torch.Tensor:
    """``f ⊙ (W + s·B·A)`` with ``f`` given (fp32, cast back to ``W``'s dtype)."""
    adapted = weight.to(torch.float32) + delta_weight(lora_a, lora_b, scale, layout)
    return (_broadcast(factor.to(torch.float32), adapted, layout) * adapted).to(weight.dtype)
