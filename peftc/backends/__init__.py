"""Compilation targets, by name. Each entry is imported only when that target is used."""

from __future__ import annotations

import importlib

from peftc.backends.base import Availability, Backend, Capabilities, Lowered, Runner
from peftc.errors import BackendUnavailable, UnsupportedError, one_of

BACKENDS: dict[str, str] = {"onnx": "peftc.backends.onnx:OnnxBackend"}


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``, checked to be available on this machine.

    Raises:
        UnsupportedError: no such target.
        BackendUnavailable: the target's runtime is missing here (the reason says what to install).
    """
    path = BACKENDS.get(name)
    if path is None:
        raise UnsupportedError(f"unknown target {name!r}; available targets: {one_of(sorted(BACKENDS))}")
    module, _, attr = path.partition(":")
    backend = getattr(importlib.import_module(module), attr)()
    availability = backend.available()
    if not availability.ok:
        raise BackendUnavailable(f"target {name!r} is unavailable: {availability.reason}")
    return backend


__all__ = ["BACKENDS", "Availability", "Backend", "Capabilities", "Lowered", "Runner", "get_backend"]
