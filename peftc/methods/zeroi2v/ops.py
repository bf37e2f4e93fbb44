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
keep their values). :data:`TEMPORAL_SHIFT`'s body is one gather: with channels in groups of
``gcd(C, span bounds)``, the activation viewed as rows ``(frame, token…, group)`` of one group each is
gathered by a row index computed from the static spans and frame count (a constant when the token
count is static). Exported that is ONNX ``Reshape``, ``Gather``, ``Reshape``, which TensorRT's parser
accepts: one copy of the activation in contiguous blocks, where slicing the spans out and
concatenating them back moved it twice in small strided pieces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peftc.ops import SiteOp, composite_op

LINEAR_ADAPTER = SiteOp(
    name="linear_adapter",
    form="activation",
    tensor_roles=("down_weight", "down_bias", "up_weight", "up_bias"),
    scalars=("scale", "residual"),
)
TEMPORAL_SHIFT = SiteOp(
    name="temporal_shift", form="activation", tensor_roles=(), scalars=("frames", "batch_axis", "spans")
)


@composite_op(
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


@composite_op("temporal_shift(Tensor x, int frames, int batch_axis, int[] spans) -> Tensor")
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
    channels = x.shape[-1]
    bounds = [v for i, v in enumerate(spans) if i % 3 != 2]
    width = math.gcd(channels, *bounds)  # channels move in groups of this many
    groups = channels // width
    group = torch.arange(groups, device=x.device)
    shift = group * 0  # from aranges only: a decomposition may not hold tensor literals
    for i in range(0, len(spans), 3):  # static spans and frames: the index is a constant
        start, stop, steps = spans[i : i + 3]
        shift = shift + steps * ((group >= start // width) & (group < stop // width))
    time = torch.arange(frames, device=x.device).unsqueeze(1)
    source = time - shift  # [frames, groups]: frame t of a group takes frame t - shift ...
    source = torch.where((source >= 0) & (source < frames), source, time)  # ... or keeps its own
    between = math.prod(x.shape[batch_axis + 1 : -1])  # the axes between time and channels, e.g. tokens
    index = (
        source.view(frames, 1, groups) * (between * groups)
        + torch.arange(between, device=x.device).view(1, -1, 1) * groups
        + group.view(1, 1, groups)
    )
    # one row per (frame, token…, group) of each clip; -1 stands for the batch, so the shape is a constant
    rows = x.reshape(*x.shape[:batch_axis], -1, frames * between * groups, width)
    axis = batch_axis + 1
    return rows.index_select(axis, index.flatten()).reshape(*x.shape[:batch_axis], -1, *x.shape[axis:])
