"""BEFT, bias tuning (PEFT ``BEFT``): its weight transform and peftc's parser.

BEFT adds a trained vector ``v`` to a linear layer's output, ``y = x Wᵀ + b + v``, which folds exactly
into the bias: ``b' = b + v``.

**Adapter files.** Keys: ``<m>.beft_bias`` ``[1, d_out]`` on ``nn.Linear`` targets, each a
``beft_bias`` site on the module's bias. ``modules_to_save`` tensors are full replacements."""

from __future__ import annotations

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

BEFT_BIAS = SiteOp(name="beft_bias", form="weight", tensor_roles=("beft_bias",), scalars=())


@composite_op("beft_bias(Tensor bias, Tensor beft_bias) -> Tensor")
def beft_bias(bias: torch.Tensor, beft_bias: torch.Tensor) -> torch.Tensor:
    """``b + v`` (fp32, cast back to ``b``'s dtype)."""
    return (bias.to(torch.float32) + beft_bias.to(torch.float32).reshape(-1)).to(bias.dtype)


FIELDS = common.Fields(
    honoured=("target_modules", "modules_to_save"),
    ignored={"init_weights": "initialisation only (the trained vectors are in the file)"},
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a BEFT adapter against the base model's modules.

    Raises:
        InputError: a key for a module that is not targeted, or a vector whose length is not d_out.
        UnsupportedError: a target that is not ``nn.Linear``, or one without a bias to fold into.
    """
    honoured, ignored = common.classify_fields(source, "BEFT", FIELDS)
    if source.config.get("target_modules") is None:
        raise InputError(f"{source.config_path}: BEFT config has no target_modules")
    grouped = common.group_keys(source, modules, common.suffix_roles({"beft_bias": "beft_bias"}), bias_field=None)
    common.check_modules(source, grouped, modules, common.targeted_modules(source.config, modules))
    sites = []
    for path, tensors in sorted(grouped.modules.items()):
        module = modules[path]
        layout = common.layout(source, module, "BEFT", ("Linear", "NonDynamicallyQuantizableLinear"))
        d_out = common.io_dims(modules, module, layout)[1]
        common.expect_shape(source, tensors["beft_bias"], (1, d_out), f"[1, d_out={d_out}] for {path!r}")
        if "bias" not in module.params:
            raise UnsupportedError(
                f"{source.describe(tensors['beft_bias'].key)}: BEFT on {path!r}, which has no bias to fold into "
                "(PEFT cannot merge it either)"
            )
        info = {"module_type": module.class_name}
        sites.append(Site(path, BEFT_BIAS.name, {"beft_bias": tensors["beft_bias"]}, {}, info, "bias"))
    return common.adapter(source, "beft", sites, grouped, honoured, ignored)


METHOD = Method("beft", ("BEFT",), parse, ops=(BEFT_BIAS,), fields=FIELDS)
