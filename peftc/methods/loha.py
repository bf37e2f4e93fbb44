"""LoHa, LyCORIS' low-rank Hadamard product (PEFT ``LOHA``): its weight transform and peftc's parser.

The update is the element-wise (Hadamard) product of two rank-r products::

    ΔW = s · (W1a·W1b) ⊙ (W2a·W2b)          s = α / r   (r, α per module from rank_pattern / alpha_pattern)

with ``W·a`` ``[d_out, r]`` and ``W·b`` ``[r, d_in·k…]``: a linear weight directly, a convolution kernel
flattened over ``(d_in/groups, *kernel)`` and reshaped back. With ``use_effective_conv2d`` a
convolution with a kernel larger than 1 instead carries a CP core per factor (``t1``, ``t2``:
``[r, r, k₁, k₂]``, ``[r, r, k, 1]`` for ``nn.Conv1d``) and ``W·a`` ``[r, d_out]``, ``W·b``
``[r, d_in/groups]``; each factor is rebuilt as::

    F[o, i, k₁, k₂] = Σ_{p,q} t[p, q, k₁, k₂] · Wb[q, i] · Wa[p, o]

and ``ΔW = s · F1 ⊙ F2`` is reshaped to the kernel's shape (which drops the trailing 1 of a Conv1d).
The product is formed in fp32 and added to ``W``, as PEFT's merge does; the result has ``W``'s dtype.

**Adapter files.** Keys: ``<m>.hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` on every
target, plus the CP cores ``hada_t1``, ``hada_t2`` on convolutions with a kernel larger than 1 when
``use_effective_conv2d`` is set. Targets are ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``, as in
PEFT. Each becomes one ``loha_weight`` site on its weight (above) with scale α/r;
``modules_to_save`` tensors are full replacements."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.ir.modules import ModuleTable
from peftc.methods import lycoris
from peftc.methods.base import Adapter, AdapterSource, ParseOptions
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

LOHA_WEIGHT = SiteOp(
    name="loha_weight",
    form="weight",
    tensor_roles=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    scalars=("scale",),
)


def _factor(wa: torch.Tensor, wb: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
    wa, wb = wa.to(torch.float32), wb.to(torch.float32)
    if core is None:
        return wa @ wb
    return torch.einsum("pqxy,qi,po->oixy", core.to(torch.float32), wb, wa)


def delta_weight(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: torch.Tensor | None,
    t2: torch.Tensor | None,
    scale: float,
    shape: torch.Size | tuple[int, ...],
) -> torch.Tensor:
    """``s·(W1a·W1b) ⊙ (W2a·W2b)`` (or its CP form) in fp32, reshaped to the parameter ``shape``."""
    delta = _factor(w1_a, w1_b, t1) * _factor(w2_a, w2_b, t2) * scale
    return delta.reshape(shape)


@composite_op(
    "loha_weight(Tensor weight, Tensor hada_w1_a, Tensor hada_w1_b, Tensor hada_w2_a, Tensor hada_w2_b, "
    "Tensor? hada_t1, Tensor? hada_t2, float scale) -> Tensor"
)
def loha_weight(
    weight: torch.Tensor,
    hada_w1_a: torch.Tensor,
    hada_w1_b: torch.Tensor,
    hada_w2_a: torch.Tensor,
    hada_w2_b: torch.Tensor,
    hada_t1: torch.Tensor | None,
    hada_t2: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``W + ΔW`` (fp32, cast back to ``W``'s dtype); see the module docstring."""
    delta = delta_weight(hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2, scale, weight.shape)
    return (weight.to(torch.float32) + delta).to(weight.dtype)


FIELDS = lycoris.lycoris_fields("use_effective_conv2d")


def expected_shapes(cfg: Mapping[str, Any], shape: tuple[int, ...], r: int) -> dict[str, tuple[int, ...]]:
    """The LoHa tensors PEFT creates for a weight of ``shape`` (``[d_out, d_in/groups, *kernel]``)."""
    d_out, d_in, kernel = shape[0], shape[1], tuple(shape[2:])
    if cfg.get("use_effective_conv2d") and any(k != 1 for k in kernel):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)  # Conv1d cores are 4-D too
        a, b = (r, d_out), (r, d_in)
        return {"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": a, "hada_w2_b": b, "hada_t1": core, "hada_t2": core}
    a, b = (d_out, r), (r, d_in * math.prod(kernel))
    return {"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": a, "hada_w2_b": b}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a LoHa adapter against the base model's modules (see ``lycoris.parse_lycoris``)."""
    return lycoris.parse_lycoris(
        source, modules, peft_type="LOHA", title="LoHa", fields=FIELDS, op=LOHA_WEIGHT, expected=expected_shapes
    )


METHOD = Method("loha", ("LOHA",), parse, ops=(LOHA_WEIGHT,), fields=FIELDS)
