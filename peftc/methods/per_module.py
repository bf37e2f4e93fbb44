"""What methods with one weight site per adapted module share: reading the config and the keys.

MiSS, HRA, SHiRA, FourierFT, C3A and WaveFT each give every targeted module its own tensors (the
keys ``<module>.<suffix>``) and fold into that module's weight. :func:`read_targets` does the common
part of their parsers — classify the config fields, check ``target_modules`` and ``bias``, map every
key to a module role, a full-tensor replacement (trained biases, ``modules_to_save``) or a recorded
unused key, and check that each targeted module has a type the method adapts and every tensor it
needs — and leaves the method to check shapes and build the site.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from peftc.errors import InputError
from peftc.ir.modules import ModuleInfo, ModuleTable
from peftc.methods import common
from peftc.methods.base import AdapterSource, AdapterTensor

LINEAR_TYPES = ("Linear", "NonDynamicallyQuantizableLinear")
"""``nn.Linear`` and its subclass in ``nn.MultiheadAttention`` (PEFT's ``isinstance`` admits both)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One targeted module with its adapter tensors."""

    module: ModuleInfo
    layout: str
    """How its weight is laid out (``peftc/ops.py`` ``LAYOUTS``)."""
    shape: tuple[int, ...]
    """Its weight's shape."""
    tensors: Mapping[str, AdapterTensor]
    """Role → tensor."""

    @property
    def path(self) -> str:
        """The module's path."""
        return self.module.path

    def describe(self) -> str:
        """``'path' (weight [d0, d1])``, for messages about the module's tensors."""
        return f"{self.path!r} (weight {list(self.shape)})"


@dataclasses.dataclass(frozen=True)
class Read:
    """An adapter file sorted into targets, with the config accounting."""

    targets: tuple[Target, ...]
    grouped: common.Grouped
    honoured: dict[str, Any]
    ignored: dict[str, str]


def read_targets(
    source: AdapterSource,
    modules: ModuleTable,
    *,
    peft_type: str,
    title: str,
    fields: common.Fields,
    roles: Mapping[str, str],
    types: Iterable[str],
    bias_field: str | None = "bias",
    optional: Iterable[str] = (),
) -> Read:
    """The targeted modules of a method whose every tensor is ``<module>.<suffix>``.

    Args:
        roles: key suffix → role; each targeted module must have every role but the ``optional`` ones.
        types: the module classes the method adapts (as PEFT dispatches them).
        bias_field: the config field naming trained biases (``none``, ``all`` or ``<method>_only``,
            as PEFT accepts), or None where the method has none.

    Raises:
        InputError: no ``target_modules``, a bad ``bias`` value, a key for no targeted module, a
            targeted module without tensors or without one of ``roles``.
        UnsupportedError: a config field peftc does not know that is set, or a targeted module of
            another type than ``types``.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, peft_type, fields)
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: {title} config has no target_modules")
    bias = cfg.get(bias_field, "none") if bias_field else "none"
    if not (bias in (None, "none", "all") or (isinstance(bias, str) and bias.endswith("_only"))):
        raise InputError(f"{source.config_path}: {bias_field}={bias!r}; expected 'none', 'all' or '<method>_only'")
    grouped = common.group_keys(source, modules, common.suffix_roles(roles), bias_field=bias_field)
    found = common.layouts(source, grouped, modules, title, tuple(types))
    targets = []
    for path, tensors in sorted(grouped.modules.items()):
        module = modules[path]
        common.require_roles(source, path, tensors, [r for r in roles.values() if r not in optional])
        shape = tuple(modules.state_shapes[module.params["weight"]])
        targets.append(Target(module, found[path], shape, tensors))
    return Read(tuple(targets), grouped, honoured, ignored)


def positive_int(source: AdapterSource, name: str, value: Any, *, minimum: int = 1) -> int:
    """A config integer (``r``, ``n_frequency``...) refused unless an integer ``>= minimum``.

    Raises:
        InputError: naming the config file, the field and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise InputError(f"{source.config_path}: {name}={value!r}; expected an integer >= {minimum}")
    return int(value)


def setting(read: Read, fields: common.Fields, name: str) -> Any:
    """An honoured field's value, PEFT's default where the config leaves it out or writes null."""
    value = read.honoured.get(name)
    return fields.defaults.get(name) if value is None else value


def suffix_pattern(pattern: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """A per-module value from FourierFT's ``n_frequency_pattern`` / C3A's ``block_size_pattern``, by
    PEFT's rule for them: the first key ``k`` with ``re.match(rf".*\\.{k}$", path)``, else the key equal
    to ``path``, else ``default``. (LoRA's ``rank_pattern`` rule differs: it also matches a key equal to
    the whole path first and groups the key's alternatives.)"""
    pattern = pattern or {}
    key = next((k for k in pattern if re.match(rf".*\.{k}$", path)), path)
    return pattern.get(key, default)
