"""What a target backend provides: lowering a program to files, and running those files.

Backends are looked up by name in ``peftc.backends.BACKENDS`` (module paths, imported lazily), so
``import peftc`` never imports onnxruntime or TensorRT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from peftc import ir
from peftc.errors import InputError
from peftc.loaders.inputs import InputSignature


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a target can do, declared next to its lowering."""

    dynamic_shapes: bool
    adapter_swap: bool
    device: str
    slots: bool = False
    """Builds ``--swappable`` artifacts: adapter slots filled from adapter files at run time
    (``peftc/swap.py``); such a backend has ``adapter_suffix`` and ``write_adapter``."""


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why not."""

    ok: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Lowered:
    """The result of lowering: files written (relative to the artifact dir) and target facts."""

    files: tuple[str, ...]
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]
    info: Mapping[str, Any]
    not_run: tuple[tuple[str, str], ...] = ()
    """``(what, why)`` for parts of the lowering that could not run here (e.g. a GPU-only engine build)."""
    verify_with: str | None = None
    """Another target whose runner checks these files when this target's own cannot run here (the
    TensorRT target without a GPU verifies its ONNX with ``onnx``); None: this target's runner."""


def check_feeds(feeds: Mapping[str, Any], expected: Sequence[str], allowed: Sequence[str] | None = None) -> None:
    """Raise :class:`InputError` naming the missing and unexpected inputs, if any.

    Args:
        expected: the inputs a caller must give (shown in the message).
        allowed: the names a call may carry (default ``expected``; runners add those they fill).
    """
    allowed = expected if allowed is None else allowed
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in allowed]
    if missing or extra:
        raise InputError(
            f"inputs do not match the model: missing {missing}, unexpected {extra}; expected {list(expected)}"
        )


class Runner(Protocol):
    """Runs a lowered artifact on numpy inputs."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """A compilation target.

    Backends are constructed with their target options (``--precision``, ``--profile``, ``--device``…)
    and validate them in ``__init__``; a backend without options is constructed with none. A backend
    whose class sets ``uses_reference = True`` also receives the adapt-stage program (sites unmerged)
    as ``lower(..., reference=program)``, to map adapter tensors to the weights they were merged into.
    """

    name: str
    capabilities: Capabilities

    def available(self) -> Availability: ...

    def versions(self) -> dict[str, str]: ...

    def lower(self, program: ir.Program, signature: InputSignature, directory: Path, progress: Any) -> Lowered: ...

    def load(self, directory: Path, target: Mapping[str, Any]) -> Runner: ...
