"""peftc: a compiler for parameter-efficient fine-tuned models.

Public API::

    artifact = peftc.compile(model, adapter, target="onnx", out="out/")
    runner = peftc.load("out/")
    outputs = runner(**inputs)

``import peftc`` is light: the compiler (torch) and the runtimes (onnxruntime, TensorRT) are imported
only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftc.errors import (
    BackendUnavailable,
    InputError,
    PassError,
    PeftcError,
    PostconditionError,
    PreconditionError,
    UnsupportedError,
    VerificationError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from peftc.api import Artifact, compile, verify
    from peftc.runtime import Runner, load

_LAZY = {
    "compile": "peftc.api",
    "verify": "peftc.api",
    "Artifact": "peftc.api",
    "load": "peftc.runtime",
    "Runner": "peftc.runtime",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peftc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Artifact",
    "BackendUnavailable",
    "InputError",
    "PassError",
    "PeftcError",
    "PostconditionError",
    "PreconditionError",
    "Runner",
    "UnsupportedError",
    "VerificationError",
    "__version__",
    "compile",
    "load",
    "verify",
]
