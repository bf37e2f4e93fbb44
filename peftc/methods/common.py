"""What every PEFT-format parser shares: config-field accounting, key → module grouping, checks.

A parser declares which config fields it honours, which are irrelevant at inference (with why), and
which it refuses; :func:`classify_fields` applies that, refuses unknown fields that are set (they may
change the math) and records unknown fields that are unset (they cannot) with a warning.
:func:`group_keys` maps every tensor key to exactly one module and role, or to a full-tensor
replacement (``modules_to_save``, trained biases), or to a recorded unused key; anything else is an
error naming the key. :func:`check_modules` then refuses keys for modules the base lacks, modules the
config does not target, and targeted modules without tensors."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleInfo, ModuleTable
from peftc.methods import peft_config
from peftc.methods.base import UNKNOWN_UNSET, Adapter, AdapterSource, AdapterTensor, Replacement, Site

PREFIX = "base_model.model."
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")  # output layers PEFT saves with save_embedding_layers

# Fields of every PEFT config that never change what a trained adapter computes.
COMMON_IGNORED = {
    "peft_type": "selects the method",
    "task_type": "describes the training task",
    "auto_mapping": "records the training-time model class",
    "peft_version": "records the PEFT version that saved the adapter",
    "base_model_name_or_path": "a training-time path; the base model is the one given to peftc",
    "revision": "a training-time hub revision",
    "inference_mode": "training flag",
}

_UNSET = (None, False, [], {}, "")


@dataclasses.dataclass(frozen=True)
class Fields:
    """A method's config fields by how they affect inference."""

    honoured: tuple[str, ...]
    ignored: Mapping[str, str]
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def classify_fields(source: AdapterSource, peft_type: str, fields: Fields) -> tuple[dict[str, Any], dict[str, str]]:
    """Check the config against ``fields``; return (honoured field → value, ignored field → why).

    Raises:
        UnsupportedError: a wrong ``peft_type``, an unsupported field that is set, or a set field
            peftc does not know (it may change the math).
    """
    cfg = source.config
    where = source.config_path
    if cfg.get("peft_type") != peft_type:
        raise UnsupportedError(f"{where}: peft_type {cfg.get('peft_type')!r} is not {peft_type}")
    for field, why in fields.unsupported.items():
        if cfg.get(field) not in _UNSET:
            raise UnsupportedError(f"{where}: {field}={cfg[field]!r}: {why}")
    ignored_all = {**COMMON_IGNORED, **fields.ignored}
    unknown = {
        k: v
        for k, v in cfg.items()
        if k not in fields.honoured and k not in ignored_all and k not in fields.unsupported and v not in _UNSET
    }
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unknown.items()))
        raise UnsupportedError(f"{where}: fields peftc does not know and that may change the math: {listed}")
    honoured = {k: cfg.get(k, fields.defaults.get(k)) for k in fields.honoured}
    ignored = {k: ignored_all[k] for k in cfg if k in ignored_all}
    ignored.update({k: "not set" for k in cfg if k in fields.unsupported})
    known = {*fields.honoured, *ignored_all, *fields.unsupported}
    ignored.update({k: UNKNOWN_UNSET for k in cfg if k not in known})
    return honoured, ignored


def check_number(source: AdapterSource, *names: str) -> None:
    for name in names:
        value = source.config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{source.config_path}: {name}={value!r} is not a number")


def check_rank(source: AdapterSource, module: str, r: Any) -> int:
    """The rank ``r`` (from ``r`` or ``rank_pattern``) of ``module``, refused unless a positive integer
    (a rank of 0 adapts nothing, and PEFT's scale ``alpha / r`` divides by it)."""
    if isinstance(r, bool) or not isinstance(r, (int, float)) or r != int(r) or r < 1:
        raise InputError(f"{source.config_path}: r={r!r} for module {module!r} (r or rank_pattern); give a rank >= 1")
    return int(r)


@dataclasses.dataclass
class Grouped:
    """The tensors of an adapter file, sorted by what they are."""

    modules: dict[str, dict[str, AdapterTensor]]
    """module path → role → tensor."""
    replacements: list[Replacement]
    unused: list[tuple[str, str]]


RoleFn = Callable[[str], tuple[str, str] | None]
"""Maps a key (without prefix) to ``(module path, role)``, or None if it is not a site tensor."""


def suffix_roles(suffixes: Mapping[str, str]) -> RoleFn:
    """A :data:`RoleFn` recognising ``<module>.<suffix>`` for each suffix (longest first)."""
    ordered = sorted(suffixes, key=len, reverse=True)

    def role(path: str) -> tuple[str, str] | None:
        for suffix in ordered:
            if path.endswith("." + suffix):
                return path[: -len(suffix) - 1], suffixes[suffix]
        return None

    return role


def group_keys(
    source: AdapterSource,
    modules: ModuleTable,
    role_of: RoleFn,
    *,
    bias_field: str | None = "bias",
    refuse: Callable[[str], str | None] = lambda path: None,
) -> Grouped:
    """Assign every key to a module role, a full-tensor replacement, or a recorded unused key."""
    grouped = Grouped({}, [], [])
    for key, tensor in source.tensors.items():
        path = key.removeprefix(PREFIX)
        why_not = refuse(path)
        if why_not:
            raise UnsupportedError(f"{source.describe(key)}: {why_not}")
        found = role_of(path)
        if found:
            module, role = found
            grouped.modules.setdefault(module, {})[role] = AdapterTensor(key, tensor)
            continue
        replacement, why_unused = classify_full_tensor(source, key, path, modules, bias_field)
        if replacement is not None:
            grouped.replacements.append(replacement)
        else:
            grouped.unused.append((key, why_unused))
    return grouped


def classify_full_tensor(
    source: AdapterSource, key: str, path: str, modules: ModuleTable, bias_field: str | None
) -> tuple[Replacement | None, str]:
    """A key that is not a site tensor: a trained bias, a ``modules_to_save`` tensor, or a duplicate."""
    cfg = source.config
    owner, _, local = path.rpartition(".")
    save = cfg.get("modules_to_save") or []
    for marker in (".modules_to_save", ".original_module"):
        if owner.endswith(marker) and peft_config.in_modules_to_save(save, owner.removesuffix(marker)):
            return None, (
                f"duplicate {marker[1:]} copy written by PEFT when {bias_field}={cfg.get(bias_field)!r} meets "
                "modules_to_save; PEFT does not load it either"
            )
    owner = owner.removesuffix(".base_layer")
    module = modules.get(owner)
    param = module.params.get(local) if module else None
    if param is None:
        raise InputError(
            f"{source.describe(key)}: maps to no module or parameter of the base model "
            f"(looked for {owner}.{local}){nearest(owner, modules)}"
        )
    bias_mode = cfg.get(bias_field, "none") if bias_field else "none"
    untie = False
    if peft_config.inside_modules_to_save(save, owner):
        reason, untie = "modules_to_save", True
    elif local == "bias" and bias_mode not in (None, "none"):
        reason = f"{bias_field}={bias_mode}"
    elif local == "weight" and (module.class_name == "Embedding" or owner.rpartition(".")[2] in OUTPUT_EMBEDDINGS):
        reason = "embedding layer saved whole by PEFT (save_embedding_layers), loaded into the base in place"
    else:
        raise InputError(
            f"{source.describe(key)}: a full tensor for {param}, but {source.config_path.name} neither "
            f"lists {owner!r} in modules_to_save nor trains biases"
            + (f" ({bias_field}={bias_mode!r})" if bias_field else "")
        )
    expected = modules.state_shapes[param]
    tensor = source.tensors[key]
    if tuple(tensor.shape) != expected:
        resized = " (the adapter was trained on a model with a resized vocabulary; resize the base's embeddings first)"
        raise InputError(
            f"{source.describe(key)}: shape {list(tensor.shape)} does not match base parameter {param} {list(expected)}"
            + (resized if "embedding" in reason else "")
        )
    return Replacement(param, AdapterTensor(key, tensor), reason, untie), ""


def adapter(
    source: AdapterSource,
    method: str,
    sites: Iterable[Site],
    grouped: Grouped,
    honoured: Mapping[str, Any],
    ignored: Mapping[str, str],
    warnings: Iterable[str] = (),
    replacements: Iterable[Replacement] | None = None,
    unused: Iterable[tuple[str, str]] | None = None,
) -> Adapter:
    """The parsed adapter: its sites plus the replacements and unused keys :func:`group_keys` found
    (``replacements`` / ``unused`` override them where a parser accounts for more keys itself)."""
    return Adapter(
        name=source.name,
        method=method,
        source=source,
        sites=tuple(sites),
        replacements=tuple(grouped.replacements if replacements is None else replacements),
        unused=tuple(grouped.unused if unused is None else unused),
        honoured=honoured,
        ignored=ignored,
        warnings=tuple(warnings),
    )


def layouts(
    source: AdapterSource, grouped: Grouped, modules: ModuleTable, method: str, supported: Iterable[str]
) -> dict[str, str]:
    """Targeted module → weight layout, after :func:`check_modules` (every targeted module has a
    supported type and tensors, every tensor a targeted module)."""
    targeted = targeted_modules(source.config, modules)
    found = {path: layout(source, modules[path], method, supported) for path in sorted(targeted)}
    check_modules(source, grouped, modules, targeted)
    return found


def targeted_modules(cfg: Mapping[str, Any], modules: ModuleTable) -> set[str]:
    """Modules the config's target rules select, among those that execute."""
    return {p for p, m in modules.items() if m.calls and peft_config.is_target(cfg, p)}


def check_modules(source: AdapterSource, grouped: Grouped, modules: ModuleTable, targeted: set[str]) -> None:
    """Keys for missing modules, untargeted modules, and targeted modules without tensors are errors."""
    cfg = source.config
    for path, tensors in sorted(grouped.modules.items()):
        # A key naming no module is the likelier mistake (a typo, another model); report it first.
        if path not in modules or not modules[path].calls:
            key = next(iter(tensors.values())).key
            raise InputError(
                f"{source.describe(key)}: maps to module {path!r}, which the base model does not execute{nearest(path, modules)}"
            )
    for path, tensors in sorted(grouped.modules.items()):
        if path not in targeted:
            key = next(iter(tensors.values())).key
            raise InputError(
                f"{source.describe(key)}: module {path!r} is not targeted by {source.config_path.name} "
                f"(target_modules={cfg.get('target_modules')!r}, exclude_modules={cfg.get('exclude_modules')!r}, "
                f"layers_to_transform={cfg.get('layers_to_transform')!r})"
            )
    missing = sorted(targeted - set(grouped.modules))
    if missing:
        raise InputError(
            f"{source.weights_path}: module {missing[0]!r} is targeted by {source.config_path.name} "
            f"(target_modules={cfg.get('target_modules')!r}) but the file has no tensors for it"
            + (f" ({len(missing) - 1} more modules likewise)" if len(missing) > 1 else "")
        )


def require_roles(source: AdapterSource, path: str, tensors: Mapping[str, AdapterTensor], roles: Iterable[str]) -> None:
    for role in roles:
        if role not in tensors:
            raise InputError(f"{source.weights_path}: module {path!r} has no {role}")


def expect_shape(source: AdapterSource, t: AdapterTensor, shape: tuple[int, ...], what: str) -> None:
    """The tensor has exactly ``shape``; the message names the key, both shapes and what was expected."""
    if tuple(t.tensor.shape) != tuple(shape):
        raise InputError(
            f"{source.describe(t.key)}: shape {list(t.tensor.shape)} does not match the base model: expected {what}"
        )


LAYOUT_OF = {
    "Linear": "linear",
    "NonDynamicallyQuantizableLinear": "linear",
    "Conv1D": "linear_t",
    "Conv1d": "conv",
    "Conv2d": "conv",
    "Conv3d": "conv",
    "Embedding": "embedding",
}


def layout(source: AdapterSource, module: ModuleInfo, method: str, supported: Iterable[str]) -> str:
    """The weight layout of ``module`` if ``method`` supports its type, else an UnsupportedError."""
    allowed = tuple(supported)
    if module.class_name in ("Bnb4Linear", "Bnb4NestedLinear", "Int8Linear", "NBitsLinear"):  # peftc/quant/modules.py
        raise UnsupportedError(
            f"{source.config_path.name}: {method} on the quantized layer {module.path!r}; on quantized bases "
            "peftc compiles LoRA (QLoRA), other methods need a float weight"
        )
    if module.class_name not in allowed or module.class_name not in LAYOUT_OF:
        raise UnsupportedError(
            f"{source.config_path.name}: {method} on {module.class_name} (module {module.path!r}) is not supported; "
            f"supported: {', '.join(allowed)}"
        )
    if "weight" not in module.params:
        raise InputError(f"module {module.path!r} has no weight parameter in the base model")
    return LAYOUT_OF[module.class_name]


def io_dims(modules: ModuleTable, module: ModuleInfo, layout_name: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear-like module from its weight shape."""
    shape = modules.state_shapes[module.params["weight"]]
    if layout_name == "linear_t":
        return shape[0], shape[1]
    if layout_name == "embedding":
        return shape[0], shape[1]
    in_features = shape[1] * (int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1)
    return in_features, shape[0]


def nearest(path: str, names: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``names`` (module paths), or ``""``."""
    close = difflib.get_close_matches(path, list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def positive_int(source: AdapterSource, name: str, default: int) -> int:
    """The config field ``name`` (``default`` when absent), refused unless a positive integer (a rank,
    a vector length, a count: zero or a fraction has no meaning, and PEFT would fail on it).

    Raises:
        InputError: naming the file and the field.
    """
    value = source.config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise InputError(f"{source.config_path}: {name}={value!r}; give an integer >= 1")
    return int(value)
