"""Type checks of the Python API's arguments (``peftc.compile``, ``peftc.load``, ``peftc.verify``).

The CLI's flags reach these functions already typed; a Python caller's ``peftc.load(None)`` or
``peftc.compile(..., merge="no")`` would otherwise end in a raw ``TypeError`` deep inside (or, for a
truthy string, be taken as ``True``). Each check raises :class:`~peftc.errors.InputError` with one
line naming the argument, the value's type and what is expected.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftc.errors import InputError


def _wrong(name: str, value: Any, expected: str) -> InputError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InputError(f"{name}={shown}: expected {expected}, got {type(value).__name__}")


def path(value: Any, name: str) -> Path:
    """``value`` as a :class:`~pathlib.Path`: a non-empty ``str`` or ``os.PathLike`` of text."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise _wrong(name, value, "a path (str or os.PathLike)")
    if not text or "\0" in text:
        raise InputError(f"{name}={value!r}: expected a path, got an empty string or one holding a NUL")
    return Path(text)


def paths(value: Any, name: str) -> tuple[Path, ...]:
    """One path or a sequence of paths (not a ``str`` taken letter by letter)."""
    if isinstance(value, (str, os.PathLike)):
        return (path(value, name),)
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise _wrong(name, value, "a path or a list of paths")
    return tuple(path(item, f"{name}[{index}]") for index, item in enumerate(value))


def texts(value: Any, name: str) -> tuple[str, ...]:
    """A sequence of strings (a lone ``str`` is refused: it would be read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _wrong(name, value, "a list of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _wrong(f"{name}[{index}]", item, "a string")
    return tuple(value)


def flag(value: Any, name: str) -> bool:
    """``True`` or ``False`` (a string such as ``"no"`` would be taken as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise _wrong(name, value, "True or False")
    return bool(value)


def integer(value: Any, name: str, *, optional: bool = False) -> int | None:
    """An integer (a Python or numpy one, not a bool), or None where ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise _wrong(name, value, "an integer" + (" or None" if optional else ""))
    return int(value)


def number(value: Any, name: str, *, optional: bool = False) -> float | None:
    """A real number (Python or numpy, not a bool), or None where ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise _wrong(name, value, "a number" + (" or None" if optional else ""))
    return float(value)


def text(value: Any, name: str, *, optional: bool = False) -> str | None:
    """A ``str``, or None where ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _wrong(name, value, "a string" + (" or None" if optional else ""))
    return value


def progress(value: Any) -> None:
    """``progress=``: None or a callable taking one line of text."""
    if value is not None and not callable(value):
        raise _wrong("progress", value, "None or a callable taking a line of text")
