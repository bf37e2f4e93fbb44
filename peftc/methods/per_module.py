"""The parse every method with one weight transform per targeted module shares.

MiSS, HRA, SHiRA, FourierFT, C3A, WaveFT, DeLoRA, FRoD, GLoRA, GraLoRA, PEANuT, RoAd and Super-Tuning
each give every targeted module its own tensors (the keys ``<module>.<suffix>``) and fold into that
module. :func:`read_targets` does the common part of their parsers, in order: the config's fields
are classified (``common.classify_fields``); the config must name ``target_modules``; ``bias`` must
be a mode PEFT accepts; every tensor key is assigned to a module role (by suffix, or by the method's
``common.RoleFn``), a full-tensor replacement (trained bias, ``modules_to_save``) or a recorded
unused key; each targeted module must have a type the method adapts; keys for modules the base
lacks or the config does not target, and targeted modules without tensors, are refused; each module
must have the roles it always needs. :func:`parse` then lets the method's :data:`SiteBuilder` turn
each module's tensors into its sites (checking their shapes against the module, :func:`require`)
and builds the :class:`~peftc.methods.base.Adapter`. A method whose sites depend on all targets at
once (WaveFT's proportional budget) loops over :func:`read_targets`' targets itself.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from peftc.errors import InputError
from peftc.ir.modules import ModuleInfo, ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, Site

LINEAR_TYPES = ("Linear", "NonDynamicallyQuantizableLinear")
"""``nn.Linear`` and its subclass in ``nn.MultiheadAttention`` (PEFT's ``isinstance`` admits both)."""


@dataclasses.dataclass(frozen=True)
class Module:
    """One targeted module with its adapter tensors, as a site builder sees it."""

    info: ModuleInfo
    layout: str
    """How its weight is laid out (``peftc/ops.py`` ``LAYOUTS``): ``linear`` (``[d_out, d_in]``),
    ``linear_t`` (Conv1D, ``[d_in, d_out]``), ``conv``..."""
    shape: tuple[int, ...]
    """The base weight's shape."""
    d_in: int
    d_out: int
    tensors: Mapping[str, AdapterTensor]
    """Its adapter tensors by role."""

    @property
    def path(self) -> str:
        """The module's path."""
        return self.info.path

    def describe(self) -> str:
        """``'path' (weight [d0, d1])``, for messages about the module's tensors."""
        return f"{self.path!r} (weight {list(self.shape)})"


@dataclasses.dataclass(frozen=True)
class Read:
    """An adapter file sorted into targeted modules, with the config accounting."""

    targets: tuple[Module, ...]
    grouped: common.Grouped
    honoured: dict[str, Any]
    ignored: dict[str, str]


SiteBuilder = Callable[[Module, list[str]], list[Site]]
"""A targeted module → its sites; may append warnings to the list."""


def read_targets(
    source: AdapterSource,
    modules: ModuleTable,
    *,
    peft_type: str,
    title: str,
    fields: common.Fields,
    roles: Mapping[str, str] | common.RoleFn,
    types: Iterable[str],
    required: Iterable[str] = (),
    bias_field: str | None = "bias",
    bias_modes: tuple[str, ...] | None = None,
) -> Read:
    """The targeted modules of a method whose every tensor belongs to one module (module docstring).

    Args:
        roles: key suffix → tensor role, or a function from a key to ``(module, role)``.
        types: the module class names the method adapts (as PEFT dispatches them).
        required: the roles every targeted module must have (others are the builder's to check).
        bias_field: the config field naming trained biases, or None where the method has none.
        bias_modes: its accepted values; None accepts what PEFT accepts for any method (``none``,
            ``all`` or ``<method>_only``).

    Raises:
        InputError: no ``target_modules``, a bad ``bias`` value, a key for no targeted module, a
            targeted module without tensors or without one of ``required``.
        UnsupportedError: a config field peftc does not know that is set, or a targeted module of
            another type than ``types``.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, peft_type, fields)
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: {title} config has no target_modules")
    _check_bias(source, bias_field, bias_modes)
    role_of = common.suffix_roles(roles) if isinstance(roles, Mapping) else roles
    grouped = common.group_keys(source, modules, role_of, bias_field=bias_field)
    found = common.layouts(source, grouped, modules, title, tuple(types))
    targets = []
    for path, tensors in sorted(grouped.modules.items()):
        info = modules[path]
        common.require_roles(source, path, tensors, required)
        d_in, d_out = common.io_dims(modules, info, found[path])
        shape = tuple(modules.state_shapes[info.params["weight"]])
        targets.append(Module(info, found[path], shape, d_in, d_out, tensors))
    return Read(tuple(targets), grouped, honoured, ignored)


def _check_bias(source: AdapterSource, bias_field: str | None, bias_modes: tuple[str, ...] | None) -> None:
    if not bias_field:
        return
    bias = source.config.get(bias_field, "none")
    if bias_modes is not None and bias not in bias_modes:
        modes = ", ".join(map(repr, bias_modes))
        raise InputError(f"{source.config_path}: {bias_field}={bias!r}; expected one of {modes}")
    if not (bias in (None, "none", "all") or (isinstance(bias, str) and bias.endswith("_only"))):
        raise InputError(f"{source.config_path}: {bias_field}={bias!r}; expected 'none', 'all' or '<method>_only'")


def parse(
    source: AdapterSource,
    modules: ModuleTable,
    *,
    peft_type: str,
    title: str,
    fields: common.Fields,
    roles: Mapping[str, str] | common.RoleFn,
    types: Iterable[str],
    build: SiteBuilder,
    required: Iterable[str] = (),
    bias_field: str | None = "bias",
    bias_modes: tuple[str, ...] | None = None,
    honoured_extra: Mapping[str, Any] | None = None,
) -> Adapter:
    """One adapter: ``build``'s sites for every module :func:`read_targets` finds (same arguments).

    Raises:
        InputError: as :func:`read_targets`, or as ``build`` (a tensor shaped unlike its module's).
        UnsupportedError: as :func:`read_targets`.
    """
    read = read_targets(
        source,
        modules,
        peft_type=peft_type,
        title=title,
        fields=fields,
        roles=roles,
        types=types,
        required=required,
        bias_field=bias_field,
        bias_modes=bias_modes,
    )
    sites: list[Site] = []
    warnings: list[str] = []
    for module in read.targets:
        sites += build(module, warnings)
    honoured = {**read.honoured, **(honoured_extra or {})}
    return common.adapter(source, peft_type.lower(), sites, read.grouped, honoured, read.ignored, warnings)


def note_fan_in_fan_out(value: Any, module: Module, warnings: list[str]) -> None:
    """PEFT's warning where the config's ``fan_in_fan_out`` disagrees with the module's layout (PEFT
    uses the layout's: true exactly for GPT-2's ``Conv1D``), appended to ``warnings``."""
    actual = module.layout == "linear_t"
    if bool(value) != actual:
        warnings.append(
            f"fan_in_fan_out={value} but {module.path!r} is a {module.info.class_name}; "
            f"using fan_in_fan_out={actual} as PEFT does"
        )


def require(source: AdapterSource, module: Module, shapes: Mapping[str, tuple[int, ...]], why: str) -> None:
    """Every role in ``shapes`` is present with exactly that shape (``why`` explains the shapes)."""
    common.require_roles(source, module.path, module.tensors, shapes)
    for role, shape in shapes.items():
        common.expect_shape(source, module.tensors[role], shape, f"{list(shape)} for {module.describe()}, {why}")


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
