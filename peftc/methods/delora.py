"""DeLoRA, decoupled low-rank adaptation (PEFT ``DELORA``): its weight transform and peftc's parser.

DeLoRA bounds a LoRA-like update by normalising each rank-one term and rescaling it with a trained
scalar ``λ`` and the base weight's column norms ``w`` (fixed when the adapter was created)::

    ΔW = B · diag(λ / r / (‖A_i‖ · ‖B^i‖)) · A · diag(w)          W' = W + ΔW

with ``A`` ``[r, d_in]`` (``‖A_i‖``: norm of row i), ``B`` ``[d_out, r]`` (``‖B^i‖``: norm of column
i), each norm clamped below at 1e-4 as PEFT does, ``λ`` ``[1]`` and ``w`` ``[d_in]``. PEFT's merge
adds exactly this ``ΔW``; its unmerged forward computes ``((x ⊙ w) Aᵀ ⊙ diag) Bᵀ`` added to the base
output, the same function (checked against PEFT's layers in the tests). The update is formed in fp32
and added to ``W``; the result has ``W``'s dtype.

**Adapter files.** Keys per target (``nn.Linear`` only, as in PEFT): ``<m>.delora_A`` ``[r, d_in]``,
``<m>.delora_B`` ``[d_out, r]``, ``<m>.delora_lambda`` ``[1]`` (trained: the config's
``delora_lambda`` / ``lambda_pattern`` are only its initial value) and ``<m>.delora_w_norm``
``[d_in]`` (a saved buffer, which PEFT loads over the norms it computes from the base weight, so the
file's value is used). ``r`` per module comes from ``rank_pattern``, else ``r``. Trained biases
(``bias``) and ``modules_to_save`` tensors are full replacements. Each target becomes one
``delora_weight`` site on its weight.
"""

from __future__ import annotations

import torch

from peftc.ir.modules import ModuleTable
from peftc.methods import common, peft_config, per_module
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

DELORA_WEIGHT = SiteOp(
    name="delora_weight",
    form="weight",
    tensor_roles=("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    scalars=("r",),
)
NORM_FLOOR = 1e-4
"""PEFT clamps the row norms of A and the column norms of B to at least this."""


def delta_weight(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, w_norm: torch.Tensor, r: int) -> torch.Tensor:
    """``B · diag(λ/r/(‖A_i‖‖B^i‖)) · A · diag(w)`` in fp32, ``[d_out, d_in]``."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    a_norm = torch.clamp(torch.linalg.vector_norm(a, dim=1), min=NORM_FLOOR)
    b_norm = torch.clamp(torch.linalg.vector_norm(b, dim=0), min=NORM_FLOOR)
    scale = lam.to(torch.float32).reshape(1) / r / (a_norm * b_norm)
    return (b * scale) @ (a * w_norm.to(torch.float32).reshape(1, -1))


@composite_op(
    "delora_weight(Tensor weight, Tensor delora_a, Tensor delora_b, Tensor delora_lambda, Tensor delora_w_norm, "
    "int r) -> Tensor"
)
def delora_weight(
    weight: torch.Tensor,
    delora_a: torch.Tensor,
    delora_b: torch.Tensor,
    delora_lambda: torch.Tensor,
    delora_w_norm: torch.Tensor,
    r: int,
) -> torch.Tensor:
    """``W + ΔW`` for an ``nn.Linear`` weight ``[d_out, d_in]`` (fp32 math, cast back to ``W``'s dtype)."""
    delta = delta_weight(delora_a, delora_b, delora_lambda, delora_w_norm, r)
    return (weight.to(torch.float32) + delta).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "rank_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "delora_lambda": "initial value of the trained λ, which is in the file",
        "lambda_pattern": "initial values of the trained λ, which is in the file",
        "module_dropout": "dropout is the identity at inference",
        "init_weights": "initialisation only (the trained factors are in the file)",
    },
    defaults={"r": 8, "bias": "none"},
)
TYPES = per_module.LINEAR_TYPES
ROLES = {role: role for role in DELORA_WEIGHT.tensor_roles}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a DeLoRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without one of its four
            tensors, a tensor whose shape does not fit its module and rank (naming the key and both
            shapes), a rank that is not a positive integer, or an unknown ``bias`` mode.
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear``.
    """
    cfg = source.config
    common.check_number(source, "r")

    def build(module: per_module.Module, warnings: list[str]) -> list[Site]:
        r = peft_config.pattern_value(cfg.get("rank_pattern"), module.path, cfg.get("r", 8))
        r = common.check_rank(source, module.path, r)
        d_in, d_out = module.d_in, module.d_out
        shapes = {"delora_A": (r, d_in), "delora_B": (d_out, r), "delora_lambda": (1,), "delora_w_norm": (d_in,)}
        per_module.require(source, module, shapes, f"r={r}")
        info = {"module_type": module.info.class_name, "r": r}
        return [Site(module.path, DELORA_WEIGHT.name, dict(module.tensors), {"r": r}, info, "weight")]

    return per_module.parse(
        source,
        modules,
        peft_type="DELORA",
        title="DeLoRA",
        fields=FIELDS,
        roles=ROLES,
        types=TYPES,
        build=build,
        bias_modes=("none", "all", "delora_only"),
    )


METHOD = Method("delora", ("DELORA",), parse, ops=(DELORA_WEIGHT,), fields=FIELDS)
