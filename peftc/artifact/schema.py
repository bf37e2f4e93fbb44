"""The types of the manifest fields that running, verifying and changing an artifact read.

A manifest is data written by whoever built the artifact: a field of the wrong type (``null`` where a
list is read, a string where a count is) must be an :class:`InputError` naming the field, not a
``TypeError`` deep inside the runner. :data:`SCHEMA` lists those fields; a field that is absent is not
checked here (reading it reports it, ``peftc.artifact.manifest.Fields``), one that is present must have
the type given.

A schema is a type or a tuple of types (``isinstance``), ``[item]`` (a list of items), ``{"*": value}``
(an object with any keys) or ``{key: schema}`` (an object whose listed keys, where present, match).
"""

from __future__ import annotations

from typing import Any

from peftc.errors import InputError

_INT = int
_NUMBER = (int, float)
_NAME = str
_OPTIONAL_INT = (int, type(None))

_TENSOR_IO = [{"name": _NAME, "dtype": str, "shape": [(str, int)]}]
_SIGNATURE = {
    "inputs": [
        {"name": _NAME, "shape": [(str, int)], "dtype": str, "kind": str, "low": _OPTIONAL_INT, "high": _OPTIONAL_INT}
    ],
    "dims": {
        "*": {
            "name": _NAME,
            "min": _INT,
            "max": _OPTIONAL_INT,
            "sum_of": [str],
            "multiple": _INT,
            "natural": _OPTIONAL_INT,
        }
    },
}
_SLOTS = {
    "rank": _INT,
    "dtype": str,
    "bank": _INT,
    "slot_depth": _INT,
    "slot_dtype": str,
    "slots": [
        {
            "module": _NAME,
            "kind": str,
            "d_in": _INT,
            "d_out": _INT,
            "fan_in_fan_out": bool,
            "capacity": _INT,
            "tensors": {"*": {"name": _NAME, "shape": [_INT]}},
            "keys": {"*": str},
        }
    ],
}
SCHEMA: dict[str, Any] = {
    "adapters": [
        {
            "name": _NAME,
            "method": str,
            "path": str,
            "config_file": str,
            "weights_file": str,
            "slot_file": str,
            "sites": list,
            "sha256": {"*": str},
        }
    ],
    "options": {
        "target": str,
        "merge": bool,
        "seed": _INT,
        "oracle": bool,
        "inputs": [str],
        "base_residual": bool,
        "task_id": _OPTIONAL_INT,
        "precision": (str, type(None)),
        "max_error": (int, float, type(None)),
        "swappable": bool,
        "max_rank": _OPTIONAL_INT,
        "multi_adapter": _INT,
        "task": (str, type(None)),
    },
    "model": {"spec": str, "files": {"*": str}, "image_size": str},
    "target": {
        "name": str,
        "inputs": _TENSOR_IO,
        "outputs": _TENSOR_IO,
        "signature": _SIGNATURE,
        "slots": _SLOTS,
        "default_adapter": (str, type(None)),
        "files": [{"path": str, "sha256": str, "bytes": _INT}],
        "precision": {"compute": str, "checkpoint": str, "how": str, "budget": (int, float, type(None))},
    },
    "verification": {"passed": bool, "cases": [{"sizes": {"*": _INT}, "outputs": [{"name": _NAME}]}]},
    "timings": {"*": _NUMBER},
}


def check(data: Any, schema: Any, where: str, path: str = "") -> None:
    """``data`` matches ``schema`` (see the module docstring).

    Raises:
        InputError: naming ``where`` and the first field whose type differs.
    """
    if isinstance(schema, list):
        _expect(data, list, where, path)
        for index, item in enumerate(data):
            check(item, schema[0], where, f"{path}[{index}]")
    elif isinstance(schema, dict):
        _expect(data, dict, where, path)
        for key, value in data.items() if "*" in schema else ((k, data[k]) for k in schema if k in data):
            check(value, schema.get("*", schema.get(key)), where, f"{path}.{key}" if path else str(key))
    else:
        _expect(data, schema, where, path)


def _expect(data: Any, types: Any, where: str, path: str) -> None:
    types = types if isinstance(types, tuple) else (types,)
    is_bool = isinstance(data, bool)
    if isinstance(data, types) and (not is_bool or bool in types):
        return
    names = " or ".join({type(None): "null", dict: "object", list: "list"}.get(t, t.__name__) for t in types)
    got = "null" if data is None else {dict: "an object", list: "a list"}.get(type(data), repr(data)[:40])
    raise InputError(f"{where}: field {path!r} should be {names}, got {got}; the manifest was edited or is damaged")
