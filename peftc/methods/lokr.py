"""LoKr, LyCORIS' low-rank Kronecker product (PEFT ``LOKR``): its weight transform and peftc's parser.

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

**Adapter files.** PEFT splits ``d_out = a·b`` and ``d_in/groups = c·d`` (:func:`factorization`) and
stores, per target:

* the left factor ``<m>.lokr_w1`` ``[a, c]``, or ``lokr_w1_a`` ``[a, r]`` + ``lokr_w1_b`` ``[r, c]`` when
  ``decompose_both`` and ``r < max(a, c)/2``;
* the right factor ``<m>.lokr_w2`` ``[b, d, *kernel]`` when ``r ≥ max(b, d)/2``; otherwise, for a
  convolution with a kernel larger than 1 under ``use_effective_conv2d``, the CP form ``lokr_t2``
  ``[r, r, *kernel]`` (``[r, r, k, 1]`` for Conv1d) + ``lokr_w2_a`` ``[r, b]`` + ``lokr_w2_b`` ``[r, d]``;
  else ``lokr_w2_a`` ``[b, r]`` + ``lokr_w2_b`` ``[r, d·k…]``.

Targets are ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``, as in PEFT. Each becomes one
``lokr_weight`` site on its weight (above) with scale α/r; ``modules_to_save`` tensors
are full replacements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.ir.modules import ModuleTable
from peftc.methods import common, lycoris
from peftc.methods.base import Adapter, AdapterSource, ParseOptions
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

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


@composite_op(
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


FIELDS = lycoris.lycoris_fields("use_effective_conv2d", "decompose_both", "decompose_factor")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m·n = dimension``, as LyCORIS (and PEFT) do.

    A positive ``factor`` that divides ``dimension`` is taken as ``m`` as is (so ``m > n`` can
    happen). Otherwise ``m`` is the largest divisor not above ``factor`` (any, for -1) that is reached
    walking the divisors upwards until they pass √dimension; the pair is then returned ascending.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, dimension + 1):
        if dimension % candidate:
            continue
        if candidate > limit:
            break
        m = candidate
        if m >= dimension // m:
            break
    return min(m, dimension // m), max(m, dimension // m)


def expected_shapes(cfg: Mapping[str, Any], shape: tuple[int, ...], r: int) -> dict[str, tuple[int, ...]]:
    """The LoKr tensors PEFT creates for a weight of ``shape`` (``[d_out, d_in/groups, *kernel]``)."""
    kernel = tuple(shape[2:])
    factor = int(cfg.get("decompose_factor", -1))
    a, b = factorization(shape[0], factor)
    c, d = factorization(shape[1], factor)
    tensors: dict[str, tuple[int, ...]]
    if cfg.get("decompose_both") and r < max(a, c) / 2:
        tensors = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    else:
        tensors = {"lokr_w1": (a, c)}
    if r >= max(b, d) / 2:
        tensors["lokr_w2"] = (b, d, *kernel)
    elif cfg.get("use_effective_conv2d") and any(k != 1 for k in kernel):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        tensors.update(lokr_t2=core, lokr_w2_a=(r, b), lokr_w2_b=(r, d))
    else:
        tensors.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
    return tensors


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a LoKr adapter against the base model's modules (see ``lycoris.parse_lycoris``)."""
    common.check_number(source, "decompose_factor")
    return lycoris.parse_lycoris(
        source, modules, peft_type="LOKR", title="LoKr", fields=FIELDS, op=LOKR_WEIGHT, expected=expected_shapes
    )


METHOD = Method("lokr", ("LOKR",), parse, ops=(LOKR_WEIGHT,), fields=FIELDS)
