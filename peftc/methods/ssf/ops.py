"""SSF (Scaling & Shifting your Features) as an activation site op (``shared/methods.md`` §4.1).

SSF trains, after chosen operations of a frozen model, a per-channel affine map of the activation::

    y = γ ⊙ x + β        γ, β ∈ R^C, over the channel axis of x (the last axis, or axis 1 of NC…)

The official code (dongzelian/SSF, ``ssf_ada``) picks the axis from the vector's length: the last
axis if its size is C, else axis 1. :data:`SSF` is one ``peftc::ssf(x, γ, β, axis)`` node placed after
the operation's output; its eager body below is that definition.

Because ``y`` is affine per channel it folds into a neighbouring layer with zero inference cost.
:func:`fold_after` (into the producer of ``x``) and :func:`fold_before` (into the consumer of ``y``)
are the fold math ``fold-ssf`` uses, computed in fp32 and cast back to the parameter's dtype:

* producer with out-channel axis 0 — Linear/Conv weight, or the 1-D affine of a LayerNorm, GroupNorm
  or BatchNorm: ``W' = diag(γ)·W``, ``b' = γ ⊙ b + β`` (``b`` absent: ``b' = β``);
* consumer Linear/Conv whose input channels are ``y``'s channels: ``W' = W·diag(γ)``,
  ``b' = b + W·β`` (a convolution sums ``W`` over its kernel; exact only without zero padding, which
  would feed the border taps 0 instead of ``β``).
"""

from __future__ import annotations

import torch

from peftc.ops import SiteOp, composite_op

SSF = SiteOp(name="ssf", form="activation", tensor_roles=("ssf_scale", "ssf_shift"), scalars=("axis",))


def channel_shape(rank: int, axis: int) -> list[int]:
    """``[1, …, -1, …, 1]``: a vector viewed to broadcast along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return shape


@composite_op("ssf(Tensor x, Tensor ssf_scale, Tensor ssf_shift, int axis) -> Tensor")
def ssf(x: torch.Tensor, ssf_scale: torch.Tensor, ssf_shift: torch.Tensor, axis: int) -> torch.Tensor:
    """``x * γ + β`` with ``γ``, ``β`` broadcast along ``axis`` (in ``x``'s dtype, as the official code)."""
    shape = channel_shape(x.dim(), axis)
    return x * ssf_scale.to(x.dtype).reshape(shape) + ssf_shift.to(x.dtype).reshape(shape)


def fold_after(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The producer's ``(diag(γ)·W, γ ⊙ b + β)``; ``W``'s axis 0 is the channel axis."""
    gamma = scale.to(torch.float32).reshape(-1)
    beta = shift.to(torch.float32).reshape(-1)
    new_weight = weight.to(torch.float32) * gamma.reshape(channel_shape(weight.dim(), 0))
    new_bias = beta if bias is None else gamma * bias.to(torch.float32) + beta
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype if bias is None else bias.dtype)


def fold_before(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's ``(W·diag(γ), b + W·β)``; ``W`` is ``[d_out, d_in, *kernel]`` (groups = 1)."""
    gamma = scale.to(torch.float32).reshape(-1)
    beta = shift.to(torch.float32).reshape(-1)
    w = weight.to(torch.float32)
    new_weight = w * gamma.reshape(channel_shape(weight.dim(), 1))
    taps = w.flatten(2).sum(-1) if weight.dim() > 2 else w  # a convolution adds W·β once per kernel tap
    new_bias = taps @ beta + (0.0 if bias is None else bias.to(torch.float32))
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype if bias is None else bias.dtype)
