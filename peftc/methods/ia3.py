"""peftc's parser for Hugging Face PEFT (IA)³ adapters (``peft_type: "IA3"``).

Keys: ``<m>.ia3_l`` on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d/3d`` targets, shaped as PEFT
creates them: ``[d_out, 1]`` (output scaling) or ``[1, d_in]`` (input scaling, ``feedforward_modules``)
for linear layers, ``[1, n, 1, …]`` for convolutions. ``modules_to_save`` tensors are full replacements.
Each target becomes an ``ia3_weight`` site on its weight, plus one on its bias for output scaling
(``peftc/ops/ia3.py``).
"""

from __future__ import annotations

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable, conv_attributes
from peftc.methods import common, peft_config
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.ops.ia3 import IA3_WEIGHT

FIELDS = common.Fields(
    honoured=("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save"),
    ignored={"init_ia3_weights": "initialisation only (the trained vectors are in the file)"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D", "Conv2d", "Conv3d")


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an (IA)³ adapter against the base model's modules.

    Raises:
        InputError: a key that maps to no targeted module, a targeted module without a vector, or a
            vector whose shape fits neither the module's output nor its input channels.
        UnsupportedError: a target that is not a linear layer or a 2-D/3-D convolution.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "IA3", FIELDS)
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: (IA)³ config has no target_modules")
    grouped = common.group_keys(source, modules, common.suffix_roles({"ia3_l": "ia3_l"}), bias_field=None)
    common.check_modules(source, grouped, modules, common.targeted_modules(cfg, modules))
    sites: list[Site] = []
    warnings: list[str] = []
    for path, tensors in sorted(grouped.modules.items()):
        module = modules[path]
        layout = common.layout(source, module, "(IA)³", TYPES)
        common.require_roles(source, path, tensors, ["ia3_l"])
        if layout == "linear_t" and not cfg.get("fan_in_fan_out"):
            warnings.append(f"fan_in_fan_out=False but {path!r} is a Conv1D; using fan_in_fan_out=True as PEFT does")
        feedforward = peft_config.is_feedforward(cfg.get("feedforward_modules"), path)
        shape = modules.state_shapes[module.params["weight"]]
        vector = tensors["ia3_l"]
        groups = 1
        if layout == "conv":
            groups = int((conv_attributes(module) or {}).get("groups", 1)) if feedforward else 1
            channels = shape[1] * groups if feedforward else shape[0]
            expected = (1, channels, *([1] * (len(shape) - 2)))
            axis = 1 if feedforward else 0
        else:
            d_in, d_out = common.io_dims(modules, module, layout)
            expected = (1, d_in) if feedforward else (d_out, 1)
            axis = (1 if feedforward else 0) if layout == "linear" else (0 if feedforward else 1)
        side = "input (feedforward_modules)" if feedforward else "output"
        common.expect_shape(
            source, vector, expected, f"{list(expected)} for {side} scaling of {path!r} (weight {list(shape)})"
        )
        info = {"module_type": module.class_name, "side": "input" if feedforward else "output"}
        sites.append(Site(path, IA3_WEIGHT.name, {"ia3_l": vector}, {"axis": axis, "groups": groups}, info, "weight"))
        if not feedforward and "bias" in module.params:
            sites.append(Site(path, IA3_WEIGHT.name, {"ia3_l": vector}, {"axis": 0, "groups": 1}, info, "bias"))
    return common.adapter(source, "ia3", sites, grouped, honoured, ignored, warnings)
