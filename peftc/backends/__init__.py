"""Compilation targets, by name. Each entry is imported only when that target is used."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from peftc.backends.base import (
    Availability,
    Backend,
    Capabilities,
    Lowered,
    LowerRequest,
    Runner,
    SlotBackend,
    SlotRunner,
)
from peftc.errors import BackendUnavailable, UnsupportedError, one_of

BACKENDS: dict[str, str] = {
    "onnx": "peftc.backends.onnx:OnnxBackend",
    "aoti": "peftc.backends.aoti:AotiBackend",
    "trt": "peftc.backends.tensorrt:TensorRTBackend",
}


def get_backend(name: str, options: Mapping[str, Any] | None = None) -> Backend:
    """The backend registered as ``name``, configured with ``options`` and checked to be available here.

    Raises:
        UnsupportedError: no such target, or options given to a target that takes none.
        InputError: an option the target rejects (named in the message).
        BackendUnavailable: the target's runtime is missing here (the reason says what to install).
    """
    path = BACKENDS.get(name)
    if path is None:
        raise UnsupportedError(f"unknown target {name!r}; available targets: {one_of(sorted(BACKENDS))}")
    module, _, attr = path.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    given = {k: v for k, v in (options or {}).items() if v not in (None, False, (), [])}
    if given and "options" not in inspect.signature(cls).parameters:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
        raise UnsupportedError(f"target {name!r} takes no target options ({flags})")
    backend = cls(given) if given else cls()
    availability = backend.available()
    if not availability.ok:
        raise BackendUnavailable(f"target {name!r} is unavailable: {availability.reason}")
    return backend


__all__ = [
    "BACKENDS",
    "Availability",
    "Backend",
    "Capabilities",
    "LowerRequest",
    "Lowered",
    "Runner",
    "SlotBackend",
    "SlotRunner",
    "get_backend",
]
