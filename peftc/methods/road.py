"""RoAd, 2-D rotary adaptation (PEFT ``ROAD``): its weight transform and peftc's parser.

RoAd rotates and scales pairs of a linear layer's *outputs*. The outputs are split into groups of
``g`` (``group_size``); inside a group, output ``j < g/2`` is paired with output ``j + g/2``, and
each pair ``(y₁, y₂)`` becomes::

    y₁' = f₁ y₁ − s₁ y₂          y₂' = f₂ y₂ + s₂ y₁        (f = α·cos θ, s = α·sin θ, per output)

i.e. ``y' = f ⊙ y + s ⊙ rot(y)`` with ``rot`` swapping the halves of each group and negating the
first. It acts on the whole output, bias included, so it folds into both parameters, as PEFT's
merge writes them (``R·W`` and ``R·b``)::

    W' = f ⊙ W + s ⊙ rot(W)      b' = f ⊙ b + s ⊙ rot(b)       (rows of W are outputs)

How ``f`` and ``s`` come from the trained ``θ`` and ``α`` depends on ``variant``:

* ``road_1``: ``θ``, ``α`` ``[d_out/2]``, one value per pair: each group's ``g/2`` values are used
  for both halves (``f₁ = f₂``, ``s₁ = s₂``);
* ``road_2``: ``[d_out]``, one value per output;
* ``road_4``: ``[2·d_out]``, per group ``2g`` values: the first ``g`` give ``f = α·cos θ``, the
  next ``g`` give ``s = α·sin θ``.

PEFT's unmerged forward applies ``y' = f ⊙ y + s ⊙ rot(y)`` to the base output; the tests check it
against the transform above. Computed in fp32 and cast back to the parameter's dtype.

**Adapter files.** Keys: ``<m>.road_theta`` and ``<m>.road_alpha`` per target (``nn.Linear`` only,
as in PEFT), sized by ``variant`` as above; ``d_out`` must be a multiple of ``group_size``.
``modules_to_save`` tensors are full replacements. Each target becomes a ``road_weight`` site on
its weight and, when it has one, another on its bias.
"""

from __future__ import annotations

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

ROAD_WEIGHT = SiteOp(
    name="road_weight", form="weight", tensor_roles=("road_theta", "road_alpha"), scalars=("variant", "group_size")
)
VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}
"""Each variant's trained values per output."""


def coefficients(theta: torch.Tensor, alpha: torch.Tensor, variant: str, group_size: int) -> tuple[torch.Tensor, ...]:
    """``(f, s)``, each ``[d_out]`` in fp32, from the trained ``θ``, ``α`` (module docstring)."""
    theta, alpha = theta.to(torch.float32), alpha.to(torch.float32)
    half = group_size // 2
    if variant == "road_1":  # one value per pair: repeat each group's g/2 values for both halves
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
    if variant == "road_4":
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)
    return alpha * theta.cos(), alpha * theta.sin()


@composite_op("road_weight(Tensor param, Tensor road_theta, Tensor road_alpha, str variant, int group_size) -> Tensor")
def road_weight(
    param: torch.Tensor, road_theta: torch.Tensor, road_alpha: torch.Tensor, variant: str, group_size: int
) -> torch.Tensor:
    """``f ⊙ P + s ⊙ rot(P)`` over the output axis of a weight ``[d_out, d_in]`` or bias ``[d_out]``."""
    f, s = coefficients(road_theta, road_alpha, variant, group_size)
    rows = param.to(torch.float32).reshape(param.shape[0], -1)
    grouped = rows.reshape(-1, 2, group_size // 2, rows.shape[1])
    rotated = torch.stack((-grouped[:, 1], grouped[:, 0]), dim=1).reshape(rows.shape)
    return (f[:, None] * rows + s[:, None] * rotated).reshape(param.shape).to(param.dtype)


FIELDS = common.Fields(
    honoured=("variant", "group_size", "target_modules", "modules_to_save"),
    ignored={"init_weights": "initialisation only (the trained angles and scales are in the file)"},
    defaults={"variant": "road_1", "group_size": 64},
)
TYPES = per_module.LINEAR_TYPES


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a RoAd adapter against the base model's modules.

    Raises:
        InputError: an unknown ``variant``; a ``group_size`` that is not a positive even number or
            does not divide a target's outputs; a key for no targeted module, a targeted module
            without ``road_theta``/``road_alpha``, or one sized unlike ``variant`` asks (naming the key
            and both shapes).
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear``.
    """
    cfg = source.config
    common.check_number(source, "group_size")
    variant = "road_1" if cfg.get("variant") is None else cfg["variant"]
    group_size = 64 if cfg.get("group_size") is None else cfg["group_size"]
    if variant not in VARIANTS:
        raise InputError(f"{source.config_path}: variant={variant!r}; expected one of {', '.join(VARIANTS)}")
    if group_size != int(group_size) or group_size <= 0 or group_size % 2:
        raise InputError(f"{source.config_path}: group_size={group_size!r}; it must be a positive even number")
    group_size = int(group_size)

    def build(module: per_module.Module, warnings: list[str]) -> list[Site]:
        if module.d_out % group_size:
            raise InputError(
                f"{source.config_path}: group_size={group_size} does not divide the {module.d_out} outputs of "
                f"{module.describe()} (PEFT refuses it too)"
            )
        size = int(module.d_out * VARIANTS[variant])
        per_module.require(source, module, {"road_theta": (size,), "road_alpha": (size,)}, f"variant={variant}")
        scalars = {"variant": variant, "group_size": group_size}
        info = {"module_type": module.info.class_name, "variant": variant, "group_size": group_size}
        params = ["weight", *(["bias"] if "bias" in module.info.params else [])]
        return [Site(module.path, ROAD_WEIGHT.name, dict(module.tensors), scalars, info, p) for p in params]

    return per_module.parse(
        source,
        modules,
        peft_type="ROAD",
        title="RoAd",
        fields=FIELDS,
        roles={"road_theta": "road_theta", "road_alpha": "road_alpha"},
        types=TYPES,
        build=build,
        bias_field=None,
    )


METHOD = Method("road", ("ROAD",), parse, ops=(ROAD_WEIGHT,), fields=FIELDS)
