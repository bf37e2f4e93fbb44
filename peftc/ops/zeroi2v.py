"""ZeroI2V's linear adapters and STDHA's temporal shift as activation site ops (``shared/methods.md`` §4.5).

**Linear adapter.** ZeroI2V (leexinhao/ZeroI2V, ``LinearAdapter``) puts a down/up pair of Linears with
no non-linearity in between around the frozen projections, with a residual and a script-level scale
``s`` (the released models use ``s = 0.5``)::

    f(x) = x + s·(W₂(W₁x + b₁) + b₂)        (the dropout between them is the identity at inference)

:data:`LINEAR_ADAPTER` is one ``peftc::linear_adapter`` node computing exactly that. ``f`` is affine,
``f(x) = M x + c`` with ``M = I + s·W₂W₁`` and ``c = s·(W₂b₁ + b₂)`` (:func:`adapter_affine`; without
the residual ``M = s·W₂W₁``), so it folds into the neighbouring projection ``y = W x + b``
(``tools/weight_reparam.py``):

* adapter before the projection (input side): ``W' = W·M``, ``b' = W·c + b`` (:func:`fold_input`);
* adapter after the projection (output side): ``W' = M·W``, ``b' = M·b + c`` (:func:`fold_output`).

**Temporal shift (STDHA).** STDHA (``mmaction/models/common/stdha.py``, ``TemporalShift``) moves a few
channels of the keys and values one frame along time right after the QKV projection, so some heads
attend to the neighbouring frames: zero parameters, zero FLOPs. Frames are folded into the batch axis
as ``(b t)`` (time innermost). For a channel span shifted by ``k > 0`` frame ``t`` takes frame
``t - k``'s values and frames ``0 … k-1`` keep their own; for ``k < 0`` frame ``t`` takes ``t + |k|`` and
the last ``|k|`` frames keep their own (the official code writes into a clone, so the boundary frames
keep their values). :data:`TEMPORAL_SHIFT`'s body builds this from reshape, slice and concat only —
the ops exporters emit for it (ONNX ``Reshape``/``Slice``/``Concat``), which TensorRT's parser accepts;
the Python loop over spans runs once, at trace time, because spans and frame count are static.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftc.ops.base import SiteOp, weight_op

LINEAR_ADAPTER = SiteOp(
    name="linear_adapter",
    form="activation",
    tensor_roles=("down_weight", "down_bias", "up_weight", "up_bias"),
    scalars=("scale", "residual"),
)
TEMPORAL_SHIFT = SiteOp(
    name="temporal_shift", form="activation", tensor_roles=(), scalars=("frames", "batch_axis", "spans")
)


@weight_op(
    "linear_adapter(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor? up_bias, "
    "float scale, bool residual) -> Tensor"
)
def linear_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: float,
    residual: bool,
) -> torch.Tensor:
    """``x + s·(W₂(W₁x + b₁) + b₂)`` (without ``x`` when ``residual`` is false), in ``x``'s dtype."""
    update = F.linear(F.linear(x, down_weight, down_bias), up_weight, up_bias) * scale
    return x + update if residual else update


def adapter_affine(
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: float,
    residual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, c)`` with ``f(x) = M x + c``: ``M = I + s·W₂W₁``, ``c = s·(W₂b₁ + b₂)``, in fp32."""
    w1, w2 = down_weight.to(torch.float32), up_weight.to(torch.float32)
    matrix = (w2 @ w1) * scale
    if residual:
        matrix = matrix + torch.eye(matrix.shape[0], dtype=torch.float32)
    offset = torch.zeros(w2.shape[0], dtype=torch.float32)
    if down_bias is not None:
        offset = offset + w2 @ down_bias.to(torch.float32)
    if up_bias is not None:
        offset = offset + up_bias.to(torch.float32)
    return matrix, offset * scale


def fold_input(
    weight: torch.Tensor, bias: torch.Tensor | None, matrix: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter before ``y = W x + b``: ``(W·M, W·c + b)``, computed in fp32, in ``W``'s dtype."""
    w = weight.to(torch.float32)
    new_bias = w @ offset + (0.0 if bias is None else bias.to(torch.float32))
    return (w @ matrix).to(weight.dtype), new_bias.to(weight.dtype)


def fold_output(
    weight: torch.Tensor, bias: torch.Tensor | None, matrix: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter after ``y = W x + b``: ``(M·W, M·b + c)``, computed in fp32, in ``W``'s dtype."""
    w = weight.to(torch.float32)
    new_bias = offset if bias is None else matrix @ bias.to(torch.float32) + offset
    return (matrix @ w).to(weight.dtype), new_bias.to(weight.dtype)


@weight_op("temporal_shift(Tensor x, int frames, int batch_axis, int[] spans) -> Tensor")
def temporal_shift(x: torch.Tensor, frames: int, batch_axis: int, spans: list[int]) -> torch.Tensor:
    """Shift channel spans of ``x`` along time (see the module docstring).

    Args:
        x: ``[…, (b·frames), …, C]``: axis ``batch_axis`` holds batch and frames, time innermost;
            channels are the last axis.
        frames: frames per clip.
        batch_axis: the axis holding ``b·frames``.
        spans: flat ``[start, stop, shift, …]`` triples, sorted and non-overlapping: channels
            ``[start, stop)`` move by ``shift`` frames.
    """
    clips = x.unflatten(batch_axis, (-1, frames))
    time = batch_axis + 1
    pieces = []
    cursor = 0
    for index in range(0, len(spans), 3):  # static spans: unrolled at trace time
        start, stop, shift = spans[index : index + 3]
        if start > cursor:
            pieces.append(clips[..., cursor:start])
        pieces.append(_shift_frames(clips[..., start:stop], time, shift, frames))
        cursor = stop
    if cursor < x.shape[-1]:
        pieces.append(clips[..., cursor:])
    return torch.cat(pieces, dim=-1).flatten(batch_axis, time)


def _shift_frames(span: torch.Tensor, time: int, shift: int, frames: int) -> torch.Tensor:
    """Frame ``t`` takes frame ``t - shift``; frames with no such source keep their own values."""
    steps = abs(shift)
    if steps == 0 or steps >= frames:
        return span  # nothing moves (the official slice assignment is empty)
    if shift > 0:
        return torch.cat([span.narrow(time, 0, steps), span.narrow(time, 0, frames - steps)], dim=time)
    return torch.cat([span.narrow(time, steps, frames - steps), span.narrow(time, frames - steps, steps)], dim=time)
