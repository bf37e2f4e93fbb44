"""(IA)³ (PEFT ``IA3``; ``shared/methods.md`` §4.2): its weight transform and peftc's parser.

(IA)³ multiplies activations by a trained vector ``l``. PEFT scales the *output* of an ordinary
target (bias included) and the *input* of a ``feedforward_modules`` target; both fold exactly::

    output:  y = l ⊙ (x Wᵀ + b)   ⇔  W' = diag(l)·W,  b' = l ⊙ b
    input:   y = (l ⊙ x) Wᵀ + b   ⇔  W' = W·diag(l)

so one op scales a parameter along one axis: the output axis of a weight (0 for ``nn.Linear`` and
convolutions, 1 for a ``Conv1D`` stored ``[d_in, d_out]``), the input axis, or the only axis of a
bias. A grouped convolution's input axis holds ``d_in / groups`` channels per output channel, so the
vector is laid out per group first, as PEFT does.

**Adapter files.** Keys: ``<m>.ia3_l`` on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d/3d``
targets, shaped as PEFT creates them: ``[d_out, 1]`` (output scaling) or ``[1, d_in]`` (input
scaling, ``feedforward_modules``) for linear layers, ``[1, n, 1, …]`` for convolutions.
``modules_to_save`` tensors are full replacements. Each target becomes an ``ia3_weight`` site on its
weight, plus one on its bias for output scaling."""

from __future__ import annotations

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable, conv_attributes
from peftc.methods import common, peft_config
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

IA3_WEIGHT = SiteOp(name="ia3_weight", form="weight", tensor_roles=("ia3_l",), scalars=("axis", "groups"))


def broadcast(vector: torch.Tensor, weight: torch.Tensor, axis: int, groups: int) -> torch.Tensor:
    """The fp32 vector shaped to multiply ``weight`` along ``axis``."""
    vector = vector.to(torch.float32).reshape(-1)
    if groups > 1:  # input axis of a grouped convolution: [d_out, d_in/groups, *kernel]
        out, per_group = weight.shape[0], weight.shape[1]
        vector = vector.reshape(groups, 1, per_group).expand(groups, out // groups, per_group)
        return vector.reshape(out, per_group, *([1] * (weight.dim() - 2)))
    shape = [1] * weight.dim()
    shape[axis] = -1
    return vector.reshape(shape)


@composite_op("ia3_weight(Tensor weight, Tensor ia3_l, int axis, int groups) -> Tensor")
def ia3_weight(weight: torch.Tensor, ia3_l: torch.Tensor, axis: int, groups: int) -> torch.Tensor:
    """``weight`` scaled by ``ia3_l`` along ``axis`` (fp32, cast back to ``weight``'s dtype)."""
    return (weight.to(torch.float32) * broadcast(ia3_l, weight, axis, groups)).to(weight.dtype)


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


METHOD = Method("ia3", ("IA3",), parse, ops=(IA3_WEIGHT,), fields=FIELDS)
