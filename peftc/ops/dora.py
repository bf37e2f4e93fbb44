"""DoRA as a weight transform (``shared/methods.md`` §3.1; PEFT ``use_dora=True``).

    W' = f ⊙ (W + ΔW),   f = m / ‖W + ΔW‖,   ΔW = s·B·A (LoRA's update in the parameter's layout)

The norm is taken per output channel of the adapted weight: rows of an ``nn.Linear`` ``[d_out, d_in]``,
columns of a Conv1D ``[d_in, d_out]``, all but the first axis of a convolution kernel, and — for
embeddings — per embedding dimension over the vocabulary (columns of ``[num, dim]``). ``m`` is the
trained magnitude vector (``(d_out,)``; ``(1, d_out, 1, …)`` for convolutions; ``(dim,)`` for
embeddings). The bias is never scaled. With frozen weights ``f`` is a constant, so merging (folding
this op) and an unmerged artifact (onnxruntime folds it at load) both compute the norm once, never
per call as PEFT's eager DoRA does.
"""

from __future__ import annotations

import torch

from peftc.ops.base import SiteOp, weight_op
from peftc.ops.lora import delta_weight

DORA_WEIGHT = SiteOp(
    name="dora_weight", form="weight", tensor_roles=("lora_A", "lora_B", "magnitude"), scalars=("scale", "layout")
)


@weight_op(
    "dora_weight(Tensor weight, Tensor lora_a, Tensor lora_b, Tensor magnitude, float scale, str layout) -> Tensor"
)
def dora_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, layout: str
) -> torch.Tensor:
    """``m/‖W + s·B·A‖ ⊙ (W + s·B·A)`` in fp32, cast back to ``W``'s dtype."""
    adapted = weight.to(torch.float32) + delta_weight(lora_a, lora_b, scale, layout)
    m = magnitude.to(torch.float32).reshape(-1)
    if layout == "linear":
        factor = (m / adapted.norm(dim=1))[:, None]
    elif layout in ("linear_t", "embedding"):
        factor = (m / adapted.norm(dim=0))[None, :]
    else:  # conv: one norm per output channel over (d_in/groups, *kernel)
        factor = (m / adapted.flatten(1).norm(dim=1)).reshape(-1, *([1] * (adapted.dim() - 1)))
    return (factor * adapted).to(weight.dtype)
