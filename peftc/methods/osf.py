"""OSF, orthogonal subspace fine-tuning (PEFT ``OSF``): its weight transform and peftc's parser.

OSF splits each adapted ``nn.Linear`` weight by its singular value decomposition (fp32,
``torch.linalg.svd``, ``full_matrices=False``) into the top ``k = effective_rank`` directions, kept
frozen, and the remaining ``m − k`` (``m = min(d_out, d_in)``), which it trains::

    W = U_high S_high V_high + U₀ S₀ V₀            (U₀ [d_out, m−k], S₀ [m−k], V₀ [m−k, d_in])
    W' = W + (U·diag(S)·V − U₀·diag(S₀)·V₀)         (U, S, V: the trained factors in the file)

so ``W' = U_high S_high V_high + U S V``. PEFT's ``forward`` adds ``x·ΔWᵀ`` as one rank-2(m−k)
product (the trained factors beside the negated initial ones) and its ``merge`` adds ``ΔW`` to the
weight: the same function (measured: 2e-7 relative apart on a small model).

**Regenerated tensors.** The file holds only ``U``, ``S``, ``V``. PEFT recomputes ``U₀, S₀, V₀``
from the base weight whenever it loads the adapter, and so does peftc, the same way. ``U₀S₀V₀`` is
the part of ``W`` outside its top-``k`` singular subspace, which is unique only when singular values
``k`` and ``k+1`` differ; a tie is refused (the subspace the adapter was trained against cannot be
rebuilt), as LoRA's PiSSA residual is.

``k`` per module: ``effective_rank`` (or the value of the first ``rank_pattern`` regex found anywhere
in the module path, ``re.search``, in file order) — an integer as given, a float in (0, 1] as that
fraction of ``m`` (truncated), clamped to ``[0, m]``; unset, ``m // 2``. PEFT's OSF adapts
``nn.Linear`` only and silently leaves other targeted modules alone; peftc does the same, with a
warning.

**Adapter files.** Keys ``<m>.osf_svd_params.U_low`` ``[d_out, m−k]``, ``.S_low`` ``[m−k]`` and
``.V_low`` ``[m−k, d_in]`` per target; ``modules_to_save`` tensors are full replacements. Each target
becomes one ``osf_weight`` site on its weight (above); the update is formed in fp32 and cast back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

OSF_WEIGHT = SiteOp(
    name="osf_weight",
    form="weight",
    tensor_roles=("osf_U", "osf_S", "osf_V", "osf_U_init", "osf_S_init", "osf_V_init"),
    scalars=(),
)


def delta_weight(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, u0: torch.Tensor, s0: torch.Tensor, v0: torch.Tensor
) -> torch.Tensor:
    """``U·diag(S)·V − U₀·diag(S₀)·V₀`` in fp32, ``[d_out, d_in]``."""
    f = torch.float32
    current = (u.to(f) * s.to(f)[None, :]) @ v.to(f)
    initial = (u0.to(f) * s0.to(f)[None, :]) @ v0.to(f)
    return current - initial


@composite_op(
    "osf_weight(Tensor weight, Tensor osf_u, Tensor osf_s, Tensor osf_v, Tensor osf_u_init, Tensor osf_s_init, "
    "Tensor osf_v_init) -> Tensor"
)
def osf_weight(
    weight: torch.Tensor,
    osf_u: torch.Tensor,
    osf_s: torch.Tensor,
    osf_v: torch.Tensor,
    osf_u_init: torch.Tensor,
    osf_s_init: torch.Tensor,
    osf_v_init: torch.Tensor,
) -> torch.Tensor:
    """``W + ΔW`` for an ``nn.Linear`` weight ``[d_out, d_in]`` (fp32 math, cast back)."""
    delta = delta_weight(osf_u, osf_s, osf_v, osf_u_init, osf_s_init, osf_v_init)
    return (weight.to(torch.float32) + delta).to(weight.dtype)


FIELDS = common.Fields(
    honoured=("effective_rank", "rank_pattern", "target_modules", "modules_to_save"),
    ignored={
        "init_weights": "initialisation only (the trained factors are in the file; the initial ones are "
        "recomputed from the base weight either way)",
        "target_svd_config": "PEFT's OSF accepts and ignores it",
    },
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear")
ROLES = {f"osf_svd_params.{n}_low": f"osf_{n}" for n in "USV"}


def resolve_rank(value: Any, smaller: int) -> int:
    """``k`` from an ``effective_rank``/``rank_pattern`` value for a weight whose smaller side is ``smaller``."""
    if value is None:
        return smaller // 2
    rank = int(smaller * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(smaller, rank), 0)


def effective_rank(cfg: Mapping[str, Any], path: str, smaller: int) -> int:
    """The ``k`` PEFT keeps frozen for the module at ``path``."""
    value = cfg.get("effective_rank")
    for pattern, rank in (cfg.get("rank_pattern") or {}).items():
        if re.search(pattern, path):
            value = rank
            break
    return resolve_rank(value, smaller)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an OSF adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted linear layer without its three factors, a
            factor whose shape does not fit its module and ``effective_rank`` (naming key and shapes), or
            an ``effective_rank`` that leaves nothing frozen (PEFT refuses ``k ≤ 0``).
        UnsupportedError: a config field peftc does not know, or tied singular values at ``k``.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "OSF", FIELDS)
    common.check_number(source, "effective_rank")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: OSF config has no target_modules")
    grouped = common.group_keys(source, modules, common.suffix_roles(ROLES), bias_field=None)
    targeted = common.targeted_modules(cfg, modules)
    skipped = sorted(p for p in targeted if modules[p].class_name not in TYPES)
    warnings = [
        f"{p!r} ({modules[p].class_name}) is targeted, but PEFT's OSF adapts nn.Linear only and leaves it unchanged"
        for p in skipped
    ]
    common.check_modules(source, grouped, modules, targeted - set(skipped))
    sites = [_site(source, modules, path, tensors) for path, tensors in sorted(grouped.modules.items())]
    return common.adapter(source, "osf", sites, grouped, honoured, ignored, warnings)


def _site(source: AdapterSource, modules: ModuleTable, path: str, tensors: Mapping[str, AdapterTensor]) -> Site:
    common.layout(source, modules[path], "OSF", TYPES)
    common.require_roles(source, path, tensors, ROLES.values())
    fqn = modules[path].params["weight"]
    d_out, d_in = modules.state_shapes[fqn]
    smaller = min(d_out, d_in)
    k = effective_rank(source.config, path, smaller)
    if k <= 0:
        raise InputError(
            f"{source.config_path}: effective_rank resolves to {k} for {path!r} (weight [{d_out}, {d_in}]); "
            "PEFT requires a positive rank"
        )
    low = smaller - k
    what = f"(effective_rank k={k} of min({d_out}, {d_in}) for {path!r})"
    common.expect_shape(source, tensors["osf_U"], (d_out, low), f"[{d_out}, {low}] {what}")
    common.expect_shape(source, tensors["osf_S"], (low,), f"[{low}] {what}")
    common.expect_shape(source, tensors["osf_V"], (low, d_in), f"[{low}, {d_in}] {what}")
    initial = _initial_factors(source, path, modules.tensors[fqn], k)
    info = {
        "module_type": modules[path].class_name,
        "effective_rank": k,
        "trained_rank": low,
        "base_weight_derived": "OSF's frozen factors are rebuilt from the base weight when it is loaded",
    }
    return Site(path, OSF_WEIGHT.name, {**tensors, **initial}, {}, info, "weight")


def _initial_factors(source: AdapterSource, path: str, weight: torch.Tensor, k: int) -> dict[str, AdapterTensor]:
    """``U₀, S₀, V₀``: the base weight's singular triplets after the top ``k``, as PEFT computes them."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    if k < s.numel() and float(s[k - 1] - s[k]) <= 1e-6 * float(s[0]):
        raise UnsupportedError(
            f"{source.config_path.name}: OSF on {path!r}: singular values {k} and {k + 1} of the base weight are "
            "equal, so the frozen subspace the adapter was trained against is not determined by the weight"
        )
    factors = {"osf_U_init": u[:, k:], "osf_S_init": s[k:], "osf_V_init": vh[k:, :]}
    return {
        role: AdapterTensor(f"{role} from the SVD of {path}.weight", t.contiguous().to(weight.dtype))
        for role, t in factors.items()
    }


METHOD = Method("osf", ("OSF",), parse, ops=(OSF_WEIGHT,), fields=FIELDS)
