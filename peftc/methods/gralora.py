"""GraLoRA, granular low-rank adaptation (PEFT ``GRALORA``): its weight transform and peftc's parser.

GraLoRA splits a linear layer's inputs and outputs into ``k`` blocks each (``gralora_k``) and gives
every (input block ``n``, output block ``j``) pair its own rank-``s`` update, ``s = r/k``. The
trained ``A`` ``[k, d_in/k, r]`` holds, for input block ``n``, ``r`` columns: the ``j``-th run of
``s`` of them feeds output block ``j``; ``B`` ``[k, r, d_out/k]`` holds, for output block ``j``,
``r`` rows: the ``n``-th run of ``s`` of them reads input block ``n``. So, with ``A[n,i,j,·]`` and
``B[j,n,·,o]`` those runs::

    ΔWᵀ[(n,i), (j,o)] = Σ_σ A[n, i, j, σ] · B[j, n, σ, o]

and, with hybrid rank ``h > 0`` (``hybrid_r``), a plain LoRA term ``B_g A_g`` (``A_g``
``[h, d_in]``, ``B_g`` ``[d_out, h]``) is added::

    W' = W + s · (ΔW + B_g A_g),      s = α / (r + h)

PEFT's merge adds this ``ΔW`` (transposed for GPT-2's ``Conv1D``, which stores ``[d_in, d_out]``);
its unmerged forward computes the block products on the activations, the same function (checked
against PEFT's layers in the tests). The update is formed in fp32; the result has ``W``'s dtype.

**Adapter files.** Keys per target (``nn.Linear`` or ``Conv1D``, as in PEFT): ``<m>.gralora_A``
``[k, d_in/k, r]`` and ``<m>.gralora_B`` ``[k, r, d_out/k]``, plus
``<m>.gralora_A_general.weight`` ``[h, d_in]`` and ``<m>.gralora_B_general.weight`` ``[d_out, h]``
when ``hybrid_r > 0``. Trained biases (``bias``) and ``modules_to_save`` tensors are full
replacements. Each target becomes one ``gralora_weight`` site on its weight.
"""

from __future__ import annotations

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op, from_out_in

GRALORA_WEIGHT = SiteOp(
    name="gralora_weight",
    form="weight",
    tensor_roles=("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general"),
    scalars=("scale", "layout"),
)


def delta_weight(
    a: torch.Tensor, b: torch.Tensor, a_general: torch.Tensor | None, b_general: torch.Tensor | None
) -> torch.Tensor:
    """``ΔW + B_g A_g`` (unscaled) in fp32, ``[d_out, d_in]``; see the module docstring."""
    k, block_in, r = a.shape
    block_out = b.shape[2]
    a4 = a.to(torch.float32).reshape(k, block_in, k, r // k)  # [n, i, j, σ]
    b4 = b.to(torch.float32).reshape(k, k, r // k, block_out)  # [j, n, σ, o]
    delta = torch.einsum("nijs,jnso->nijo", a4, b4).reshape(k * block_in, k * block_out).T
    if a_general is not None and b_general is not None:
        delta = delta + b_general.to(torch.float32) @ a_general.to(torch.float32)
    return delta


@composite_op(
    "gralora_weight(Tensor weight, Tensor gralora_a, Tensor gralora_b, Tensor? gralora_a_general, "
    "Tensor? gralora_b_general, float scale, str layout) -> Tensor"
)
def gralora_weight(
    weight: torch.Tensor,
    gralora_a: torch.Tensor,
    gralora_b: torch.Tensor,
    gralora_a_general: torch.Tensor | None,
    gralora_b_general: torch.Tensor | None,
    scale: float,
    layout: str,
) -> torch.Tensor:
    """``W + s·ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    delta = delta_weight(gralora_a, gralora_b, gralora_a_general, gralora_b_general) * scale
    return (weight.to(torch.float32) + from_out_in(delta, weight, layout)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "hybrid_r",
        "alpha",
        "gralora_k",
        "fan_in_fan_out",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "gralora_dropout": "dropout is the identity at inference",
        "init_weights": "initialisation only (the trained factors are in the file)",
    },
    defaults={"r": 32, "hybrid_r": 0, "alpha": 64, "gralora_k": 2, "bias": "none"},
)
TYPES = (*per_module.LINEAR_TYPES, "Conv1D")
ROLES = {"gralora_A": "gralora_A", "gralora_B": "gralora_B"}
ROLES |= {"gralora_A_general.weight": "gralora_A_general", "gralora_B_general.weight": "gralora_B_general"}


def _settings(source: AdapterSource) -> tuple[int, int, int, float]:
    """``(r, hybrid_r, k, α)`` from the config (PEFT's defaults for absent fields), checked as PEFT does."""
    cfg = source.config
    common.check_number(source, "r", "hybrid_r", "alpha", "gralora_k")
    r, hybrid, k = (
        int(cfg.get(n) if cfg.get(n) is not None else FIELDS.defaults[n]) for n in ("r", "hybrid_r", "gralora_k")
    )
    alpha = float(cfg.get("alpha") if cfg.get("alpha") is not None else FIELDS.defaults["alpha"])
    if k <= 0 or r <= 0 or hybrid < 0 or r % k:
        raise InputError(
            f"{source.config_path}: r={r}, gralora_k={k}, hybrid_r={hybrid}: r and gralora_k must be positive, "
            "r a multiple of gralora_k and hybrid_r >= 0"
        )
    return r, hybrid, k, alpha


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a GraLoRA adapter against the base model's modules.

    Raises:
        InputError: invalid ``r``/``gralora_k``/``hybrid_r``; a target whose inputs or outputs
            ``gralora_k`` does not divide; a key for no targeted module, a targeted module without
            its factors (or hybrid factors where ``hybrid_r`` is 0), or a factor whose shape does not
            fit its module (naming the key and both shapes).
        UnsupportedError: a config field peftc does not know, or a target that is neither
            ``nn.Linear`` nor ``Conv1D``.
    """
    r, hybrid, k, alpha = _settings(source)
    fan_in_fan_out = bool(source.config.get("fan_in_fan_out", False))

    def build(module: per_module.Module, warnings: list[str]) -> list[Site]:
        d_in, d_out = module.d_in, module.d_out
        if d_in % k or d_out % k:
            raise InputError(
                f"{source.config_path}: gralora_k={k} does not divide the {d_in} inputs and {d_out} outputs of "
                f"{module.describe()} (PEFT refuses it too)"
            )
        shapes = {"gralora_A": (k, d_in // k, r), "gralora_B": (k, r, d_out // k)}
        if hybrid:
            shapes |= {"gralora_A_general": (hybrid, d_in), "gralora_B_general": (d_out, hybrid)}
        extra = next((t for role, t in module.tensors.items() if role not in shapes), None)
        if extra is not None:
            raise InputError(f"{source.describe(extra.key)}: hybrid_r=0, so PEFT creates no hybrid factors")
        per_module.require(source, module, shapes, f"r={r}, gralora_k={k}, hybrid_r={hybrid}")
        per_module.note_fan_in_fan_out(fan_in_fan_out, module, warnings)
        tensors = {role: module.tensors.get(role) for role in GRALORA_WEIGHT.tensor_roles}
        scalars = {"scale": alpha / (r + hybrid), "layout": module.layout}
        info = {"module_type": module.info.class_name, "r": r, "gralora_k": k, "hybrid_r": hybrid}
        return [Site(module.path, GRALORA_WEIGHT.name, tensors, scalars, info, "weight")]

    return per_module.parse(
        source,
        modules,
        peft_type="GRALORA",
        title="GraLoRA",
        fields=FIELDS,
        roles=ROLES,
        types=TYPES,
        build=build,
        bias_modes=("none", "all", "gralora_only"),
    )


METHOD = Method("gralora", ("GRALORA",), parse, ops=(GRALORA_WEIGHT,), fields=FIELDS)
