"""What LoHa and LoKr share (LyCORIS methods in PEFT): the config fields and the whole parse.

PEFT creates a fixed set of factor tensors per module, whose shapes follow from the config, the rank
and the base weight; each method only says which (:data:`ExpectedShapes`). One weight site per
module, scale α/r.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleInfo, ModuleTable, conv_attributes
from peftc.methods import peft_config
from peftc.methods.base import Adapter, AdapterSource, Site
from peftc.methods.common import (
    Fields,
    adapter,
    check_modules,
    check_number,
    classify_fields,
    expect_shape,
    group_keys,
    layout,
    require_roles,
    suffix_roles,
    targeted_modules,
)
from peftc.ops import SiteOp

LYCORIS_TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d")

ExpectedShapes = Callable[[Mapping[str, Any], tuple[int, ...], int], dict[str, tuple[int, ...]]]
"""(config, base weight shape, r) → the tensors PEFT creates for the module: role → shape."""


def lycoris_fields(*honoured: str) -> Fields:
    """The config fields LoHa and LoKr share, plus the method's own ``honoured`` ones."""
    return Fields(
        honoured=(
            "r",
            "alpha",
            "rank_pattern",
            "alpha_pattern",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
            *honoured,
        ),
        ignored={
            "rank_dropout": "dropout is the identity at inference",
            "rank_dropout_scale": "only rescales rank dropout, which is off at inference",
            "module_dropout": "dropout is the identity at inference",
            "init_weights": "initialisation only (the trained factors are in the file)",
        },
        defaults={"r": 8, "alpha": 8},
    )


def parse_lycoris(
    source: AdapterSource,
    modules: ModuleTable,
    *,
    peft_type: str,
    title: str,
    fields: Fields,
    op: SiteOp,
    expected: ExpectedShapes,
) -> Adapter:
    """One ``op`` weight site per targeted module, its tensors checked against ``expected``.

    Raises:
        InputError: a key for no targeted module, a targeted module without tensors, a tensor PEFT
            would not create for that module and config (or one it would that is missing), or a shape
            that differs from PEFT's (naming the key, the module and both shapes).
        UnsupportedError: a config field peftc does not know, or a module type or convolution
            ``padding_mode`` PEFT cannot merge exactly.
    """
    cfg = source.config
    honoured, ignored = classify_fields(source, peft_type, fields)
    check_number(source, "r", "alpha")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: {title} config has no target_modules")
    grouped = group_keys(source, modules, suffix_roles({r: r for r in op.tensor_roles}), bias_field=None)
    check_modules(source, grouped, modules, targeted_modules(cfg, modules))
    sites = []
    for path, tensors in sorted(grouped.modules.items()):
        module = modules[path]
        layout(source, module, title, LYCORIS_TYPES)
        refuse_padding_mode(source, module, title)
        shape = modules.state_shapes[module.params["weight"]]
        r = int(peft_config.pattern_value(cfg.get("rank_pattern"), path, cfg.get("r", 8)))
        alpha = peft_config.pattern_value(cfg.get("alpha_pattern"), path, cfg.get("alpha", 8))
        if r <= 0:
            raise InputError(f"{source.config_path}: rank {r} for module {path!r}; it must be positive")
        wanted = expected(cfg, shape, r)
        # A factor PEFT would not create says the config and the file disagree: name that first.
        for role, t in tensors.items():
            if role not in wanted:
                raise InputError(
                    f"{source.describe(t.key)}: PEFT creates no {role} for {module.class_name} {path!r} "
                    f"(weight {list(shape)}, r={r}) with this config; it creates {', '.join(wanted)}"
                )
        require_roles(source, path, tensors, wanted)
        for role, t in tensors.items():
            expect_shape(source, t, wanted[role], f"{list(wanted[role])} for {path!r} (weight {list(shape)}, r={r})")
        info = {"module_type": module.class_name, "r": r, "alpha": alpha}
        site_tensors = {role: tensors.get(role) for role in op.tensor_roles}
        sites.append(Site(path, op.name, site_tensors, {"scale": alpha / r}, info, "weight"))
    return adapter(source, peft_type.lower(), sites, grouped, honoured, ignored)


def refuse_padding_mode(source: AdapterSource, module: ModuleInfo, title: str) -> None:
    """Refuse a convolution whose call pads by itself (``padding_mode`` other than zeros).

    PEFT's unmerged forward convolves the update with zero padding while its merged weight uses the
    base's padding, so the two disagree and no single compiled model matches both.
    """
    attrs = conv_attributes(module) or {}
    if attrs.get("extra_ops"):
        raise UnsupportedError(
            f"{source.config_path.name}: {title} on {module.class_name} {module.path!r}, whose padding_mode is not "
            "'zeros': PEFT pads the update with zeros, so its merged and unmerged models differ"
        )
