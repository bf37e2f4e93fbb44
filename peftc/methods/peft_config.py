"""Hugging Face PEFT's rules for which modules an ``adapter_config.json`` targets.

Re-implemented from PEFT's documented behaviour (``check_target_module_exists``, ``get_pattern_key``,
``_set_trainable``) so that peftc reads adapters without importing PEFT; the test suite checks these
rules against PEFT itself.

* ``target_modules`` as a **string** is a regex that must match the whole module path;
  as a **list**, an entry matches the path exactly or as a ``.``-separated suffix.
* ``exclude_modules`` follows the same two forms and wins over ``target_modules``.
* ``layers_to_transform`` (list form of ``target_modules`` only) keeps modules whose *first* numbered
  path segment after ``layers_pattern`` (or after any segment, if unset) is in the given indices.
* ``rank_pattern`` / ``alpha_pattern``: the first key (in file order) that matches the end of the
  module path on a ``.`` boundary, as a regex, gives the value.
* ``modules_to_save``: a module whose path ends with an entry (plain string suffix) is replaced whole.
* (IA)³ ``feedforward_modules``: a regex string must match the whole path; a list entry matches as a
  plain string suffix (no ``.`` boundary).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

V = TypeVar("V")

_NUMBERED = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def is_excluded(exclude: str | Sequence[str] | None, path: str) -> bool:
    """True when ``exclude_modules`` removes ``path`` from the targets."""
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return path in exclude or any(path.endswith(f".{e}") for e in exclude)


def in_modules_to_save(modules_to_save: Sequence[str] | None, path: str) -> bool:
    """True when ``path`` is one of the modules an adapter replaces whole."""
    return bool(modules_to_save) and any(path.endswith(m) for m in modules_to_save)


def inside_modules_to_save(modules_to_save: Sequence[str] | None, path: str) -> bool:
    """True when ``path`` is a ``modules_to_save`` module or lies inside one (its copy holds it)."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save)


def is_target(config: Mapping[str, Any], path: str) -> bool:
    """Whether an adapter with this config adapts the module at ``path``."""
    if is_excluded(config.get("exclude_modules"), path):
        return False
    if inside_modules_to_save(config.get("modules_to_save"), path):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    found = path in targets or any(path.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if not found or layers is None or (isinstance(layers, list) and not layers):
        return found
    index = layer_index(path, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def is_feedforward(feedforward: str | Sequence[str] | None, path: str) -> bool:
    """Whether an (IA)³ target scales its input (``feedforward_modules``) rather than its output."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(f) for f in feedforward)


def layer_index(path: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer number PEFT reads from a module path (the first numbered segment)."""
    if not layers_pattern:
        match = _NUMBERED.match(path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def pattern_value(patterns: Mapping[str, V] | None, path: str, default: V) -> V:
    """The ``rank_pattern``/``alpha_pattern`` value for ``path``, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


_PATTERNS = ("target_modules", "exclude_modules", "feedforward_modules", "layers_pattern")
"""Fields that are a regex string or a list of module-name strings."""
_NAMES = ("modules_to_save",)
_PATTERN_MAPS = ("rank_pattern", "alpha_pattern")


def check_selectors(config: Mapping[str, Any], where: Any) -> None:
    """The fields that choose modules have the types PEFT gives them, and their regexes compile.

    Raises:
        InputError: naming the file and the field (a number where a list of names is read, a bad regex).
    """
    from peftc.errors import InputError

    def names(field: str, value: Any, regex: bool) -> None:
        if isinstance(value, str) and regex:
            try:
                re.compile(value)
            except re.error as e:
                raise InputError(f"{where}: {field}={value!r} is not a valid regular expression ({e})") from e
        elif not isinstance(value, (str, list)) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{where}: {field}={value!r} should be a string or a list of module names")

    for field in (*_PATTERNS, *_NAMES):
        if config.get(field) is not None:
            names(field, config[field], regex=field in _PATTERNS)
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    ):
        raise InputError(f"{where}: layers_to_transform={layers!r} should be a layer index or a list of them")
    for field in _PATTERN_MAPS:
        value = config.get(field)
        if value is not None and not isinstance(value, Mapping):
            raise InputError(f"{where}: {field}={value!r} should be an object of module pattern → value")
        for key in value or {}:
            names(f"{field} key", key, regex=True)
