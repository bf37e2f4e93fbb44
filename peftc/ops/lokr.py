"""LoKr as a weight transform (PEFT ``peft_type: "LOKR"``; LyCORIS low-rank Kronecker product).

The update is a scaled Kronecker product of two factors::

    ΔW = reshape(s · W1 ⊗ W2, shape of W)     s = α / r   (r, α per module from rank_pattern / alpha_pattern)

    W1 = lokr_w1                  [a, c]          or  lokr_w1_a · lokr_w1_b   ([a, r]·[r, c])
    W2 = lokr_w2                  [b, d, *kernel] or  lokr_w2_a · lokr_w2_b   ([b, r]·[r, d·k…])
       or, CP form (use_effective_conv2d), W2[o, i, k₁, k₂] = Σ_{p,q} lokr_t2[p, q, k₁, k₂]·w2_a[p, o]·w2_b[q, i]

where ``d_out = a·b`` and ``d_in/groups = c·d``. When W2 is 4-D (a Conv2d factor, or the CP form, which
is ``[b, d, k, 1]`` for ``nn.Conv1d``) W1 gets two trailing unit axes first, so the product is
``[a·b, c·d, k₁, k₂]``. The final reshape to the parameter's shape is the one PEFT's merge performs
and adapters were trained with. It is a plain Kronecker layout for linear and 2-D kernels, but a
full 3-D Conv1d factor ``[b, d, k]`` meets a 2-D W1: ``⊗`` prepends an axis to W1, giving
``[b, a·d, c·k]``, whose elements the reshape to ``[d_out, d_in, k]`` redistributes. That is
reproduced as is, because it is what the trained adapter means.
"""

from __future__ import annotations

import torch

from peftc.ops.base import SiteOp, weight_op

LOKR_WEIGHT = SiteOp(
    name="lokr_weight",
    form="weight",
    tensor_roles=("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    scalars=("scale",),
)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32)


def delta_weight(
    w1: torch.Tensor | None,
    w1_a: torch.Tensor | None,
    w1_b: torch.Tensor | None,
    w2: torch.Tensor | None,
    w2_a: torch.Tensor | None,
    w2_b: torch.Tensor | None,
    t2: torch.Tensor | None,
    scale: float,
    shape: torch.Size | tuple[int, ...],
) -> torch.Tensor:
    """``s · W1 ⊗ W2`` in fp32, reshaped to the parameter ``shape``; absent factors are None."""
    w1, w1_a, w1_b, w2, w2_a, w2_b, t2 = map(_f32, (w1, w1_a, w1_b, w2, w2_a, w2_b, t2))
    left = w1 if w1 is not None else w1_a @ w1_b
    if w2 is not None:
        right = w2
    elif t2 is not None:
        # At rank 1 einsum may return odd strides on a unit axis that torch.kron cannot view
        # (PEFT's own merge fails there); a contiguous copy has ordinary strides.
        right = torch.einsum("pqxy,po,qi->oixy", t2, w2_a, w2_b).clone(memory_format=torch.contiguous_format)
    else:
        right = w2_a @ w2_b
    if right.dim() == 4:
        left = left[:, :, None, None]
    return (torch.kron(left, right) * scale).reshape(shape)


@weight_op(
    "lokr_weight(Tensor weight, Tensor? lokr_w1, Tensor? lokr_w1_a, Tensor? lokr_w1_b, Tensor? lokr_w2, "
    "Tensor? lokr_w2_a, Tensor? lokr_w2_b, Tensor? lokr_t2, float scale) -> Tensor"
)
def lokr_weight(
    weight: torch.Tensor,
    lokr_w1: torch.Tensor | None,
    lokr_w1_a: torch.Tensor | None,
    lokr_w1_b: torch.Tensor | None,
    lokr_w2: torch.Tensor | None,
    lokr_w2_a: torch.Tensor | None,
    lokr_w2_b: torch.Tensor | None,
    lokr_t2: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``W + ΔW`` (fp32, cast back to ``W``'s dtype); see the module docstring."""
    delta = delta_weight(lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2, scale, weight.shape)
    return (weight.to(torch.float32) + delta).to(weight.dtype)
