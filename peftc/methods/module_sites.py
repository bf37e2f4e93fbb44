"""The parse every method with one weight transform per targeted module shares.

Steps, in order: the config's fields are classified (``common.classify_fields``); the config must
name ``target_modules``; every tensor key is assigned to a module role by suffix, a full-tensor
replacement (trained bias, ``modules_to_save``) or a recorded unused key; keys for modules the base
lacks or the config does not target, and targeted modules without tensors, are refused; each
module's type must be one the method adapts; then the method's :data:`SiteBuilder` turns each module's
tensors into its sites (checking their shapes against the module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from peftc.errors import InputError
from peftc.ir.modules import ModuleInfo, ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, Site


@dataclasses.dataclass(frozen=True)
class Module:
    """One targeted module as a site builder sees it."""

    info: ModuleInfo
    layout: str
    """``linear`` (``[d_out, d_in]``) or ``linear_t`` (Conv1D, ``[d_in, d_out]``); see ``peftc/ops.py``."""
    shape: tuple[int, ...]
    """The base weight's shape."""
    d_in: int
    d_out: int
    tensors: Mapping[str, AdapterTensor]
    """Its adapter tensors by role."""

    @property
    def path(self) -> str:
        return self.info.path

    def describe(self) -> str:
        """``'path' (weight [..])`` for messages."""
        return f"{self.path!r} (weight {list(self.shape)})"


SiteBuilder = Callable[[Module, list[str]], list[Site]]
"""A targeted module → its sites; may append warnings to the list."""


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
    bias_field: str | None = "bias",
    bias_modes: tuple[str, ...] = (),
    honoured_extra: Mapping[str, Any] | None = None,
) -> Adapter:
    """One adapter: ``build``'s sites for every targeted module (see the module docstring).

    Args:
        roles: key suffix → tensor role, or a function from a key to ``(module, role)``.
        types: the module class names the method adapts.
        bias_field: the config field naming trained biases (None: the method has none).
        bias_modes: its accepted values (checked when ``bias_field`` is set).

    Raises:
        InputError: a key for no targeted module, a targeted module without tensors, a required
            tensor missing, an unknown ``bias`` mode, or no ``target_modules``.
        UnsupportedError: a config field peftc does not know that is set, or a module type the
            method does not adapt.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, peft_type, fields)
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: {title} config has no target_modules")
    if bias_field and cfg.get(bias_field, "none") not in bias_modes:
        raise InputError(
            f"{source.config_path}: {bias_field}={cfg[bias_field]!r}; expected one of {', '.join(map(repr, bias_modes))}"
        )
    role_of = common.suffix_roles(roles) if isinstance(roles, Mapping) else roles
    grouped = common.group_keys(source, modules, role_of, bias_field=bias_field)
    common.check_modules(source, grouped, modules, common.targeted_modules(cfg, modules))
    sites: list[Site] = []
    warnings: list[str] = []
    for path, tensors in sorted(grouped.modules.items()):
        info = modules[path]
        layout = common.layout(source, info, title, types)
        d_in, d_out = common.io_dims(modules, info, layout)
        shape = tuple(modules.state_shapes[info.params["weight"]])
        sites += build(Module(info, layout, shape, d_in, d_out, tensors), warnings)
    return common.adapter(
        source, peft_type.lower(), sites, grouped, {**honoured, **(honoured_extra or {})}, ignored, warnings
    )


def require(source: AdapterSource, module: Module, shapes: Mapping[str, tuple[int, ...]], why: str) -> None:
    """Every role in ``shapes`` is present with exactly that shape (``why`` explains the shapes)."""
    common.require_roles(source, module.path, module.tensors, shapes)
    for role, shape in shapes.items():
        common.expect_shape(source, module.tensors[role], shape, f"{list(shape)} for {module.describe()}, {why}")
