"""peftc's parser for Hugging Face PEFT bias-tuning adapters (``peft_type: "BEFT"``).

Keys: ``<m>.beft_bias`` ``[1, d_out]`` on ``nn.Linear`` targets, each a ``beft_bias`` site on the
module's bias (``peftc/ops/beft.py``). ``modules_to_save`` tensors are full replacements.
"""

from __future__ import annotations

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.ops.beft import BEFT_BIAS

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
