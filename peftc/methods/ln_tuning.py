"""peftc's parser for Hugging Face PEFT LayerNorm tuning adapters (``peft_type: "LN_TUNING"``).

PEFT trains a copy of each targeted module (usually a norm layer) and saves its tensors as
``<m>.ln_tuning_layers.<param>``. Each is a full replacement of ``<m>.<param>``; the module gets its
own copy, so a tensor the base shares with other modules stays unchanged for them, as with PEFT's copy.
"""

from __future__ import annotations

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Replacement
from peftc.methods.record import Method

FIELDS = common.Fields(honoured=("target_modules", "exclude_modules", "modules_to_save"), ignored={})
MARKER = ".ln_tuning_layers."


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a LayerNorm-tuning adapter against the base model's modules.

    Raises:
        InputError: a tensor for a module that is not targeted or lacks that parameter, a shape that
            differs from the base parameter, or a targeted module without tensors (naming the key).
    """
    honoured, ignored = common.classify_fields(source, "LN_TUNING", FIELDS)
    if source.config.get("target_modules") is None:
        raise InputError(f"{source.config_path}: LN_TUNING config has no target_modules")

    def role(path: str) -> tuple[str, str] | None:
        module, marker, param = path.partition(MARKER)
        return (module, param) if marker else None

    grouped = common.group_keys(source, modules, role, bias_field=None)
    common.check_modules(source, grouped, modules, common.targeted_modules(source.config, modules))
    replacements = list(grouped.replacements)
    for path, tensors in sorted(grouped.modules.items()):
        for param, entry in sorted(tensors.items()):
            fqn = modules[path].params.get(param)
            if fqn is None:
                raise InputError(f"{source.describe(entry.key)}: module {path!r} has no parameter {param!r}")
            common.expect_shape(source, entry, modules.state_shapes[fqn], f"{list(modules.state_shapes[fqn])} ({fqn})")
            replacements.append(Replacement(fqn, AdapterTensor(entry.key, entry.tensor), "LN tuning copy", untie=True))
    return common.adapter(source, "ln_tuning", (), grouped, honoured, ignored, replacements=replacements)


METHOD = Method("ln_tuning", ("LN_TUNING",), parse, fields=FIELDS)
