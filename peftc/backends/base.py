"""What a target backend provides: lowering a program to files, and running those files.

Every backend is a :class:`Backend`; optional capabilities are protocols a backend implements or
not, and the driver asks ``isinstance(backend, SlotBackend)``:

* :class:`SlotBackend`: it builds swappable artifacts (``peftc/swap/``): its lowering keeps named
  tensors overridable, it writes adapter files, and its runner is a :class:`SlotRunner`.
* :class:`QuantizingBackend`: it computes in integer precisions by quantizing its fp32 lowering,
  layer by layer (``peftc/driver/quantize.py`` chooses the layers).

Backends are looked up by name in ``peftc.backends.BACKENDS`` (module paths, imported lazily), so
``import peftc`` never imports onnxruntime or TensorRT. They import no feature module: what a
feature needs from them is declared here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    precisions: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"fp32": "program"})
    """The precisions it computes in (``peftc/precision.py``), each with how it gets there: ``program``,
    the driver hands it a program traced in that precision; ``option``, it takes an fp32 program and the
    ``precision`` target option, and casts when it lowers; ``quantize``, it lowers the fp32 program and
    quantizes the result (a :class:`QuantizingBackend`)."""
    precision_hint: str = ""
    """Where to go for a precision it lacks (part of the refusal)."""


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
    pending: Any = None
    """What a :class:`QuantizingBackend` left unwritten for its quantizer (not part of the manifest)."""


@dataclasses.dataclass(frozen=True)
class LowerRequest:
    """What a target lowers: the program, its inputs, and what some targets need besides."""

    program: ir.Program
    """The program after the build mode's passes."""
    signature: InputSignature
    """Its inputs (names, dtypes, dynamic dims and their ranges)."""
    reference: ir.Program | None = None
    """The adapt-stage program ``program`` was optimized from (sites unmerged), which says how each
    weight was adapted (TensorRT's refit map); None: ``program`` itself."""
    overridable: tuple[str, ...] = ()
    """Tensors to keep settable at run time (adapter slots); only a :class:`SlotBackend` is given any."""
    precision: str = "fp32"
    """The precision the artifact computes in (an integer one: ``lower`` returns what it quantizes)."""


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
    and validate them in ``__init__``; a backend without options is constructed with none.
    ``lower`` writes the request's program into ``directory`` (announcing long steps to ``progress``).
    """

    name: str
    capabilities: Capabilities
    requires: str
    """What it needs to build and run here, in words (``peftc targets``; ``available`` checks it)."""

    def available(self) -> Availability: ...

    def versions(self) -> dict[str, str]: ...

    def lower(self, request: LowerRequest, directory: Path, progress: Any) -> Lowered: ...

    def load(self, directory: Path, target: Mapping[str, Any]) -> Runner: ...


@runtime_checkable
class SlotBackend(Protocol):
    """A target that builds swappable artifacts.

    ``lower`` keeps the request's ``overridable`` tensors settable at run time (their stored values
    are the defaults); ``write_adapter`` writes one adapter's values of them as a file its runner
    reads; ``load`` returns a :class:`SlotRunner`.
    """

    adapter_suffix: str
    """The file name suffix of its adapter files (``.onnx_adapter``, ``.safetensors``)."""

    def write_adapter(self, path: Path, tensors: Mapping[str, np.ndarray]) -> None: ...


@runtime_checkable
class SlotRunner(Protocol):
    """The runner of a :class:`SlotBackend`'s model: runs it with given values of its overridable tensors."""

    input_names: list[str]
    output_names: list[str]

    def load_slots(self, path: Path) -> Any:
        """One adapter file, read into a form ``run`` takes as ``slots`` (the caller keeps it)."""
        ...

    def load_values(self, values: Mapping[str, np.ndarray]) -> Any:
        """Slot values (decoded from an fp16/int8 file) in the form ``run`` takes as ``slots``."""
        ...

    def slot_values(self, path: Path) -> dict[str, np.ndarray]:
        """One adapter file's arrays, keyed as in the file."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray], slots: Any = None) -> dict[str, np.ndarray]:
        """Run with the overridable tensors set to ``slots``: a :meth:`load_slots` result, or a mapping
        of every overridable tensor to its value; None leaves them as they are."""
        ...


@dataclasses.dataclass(frozen=True)
class Layer:
    """One op a quantizer can rewrite."""

    name: str
    """Its name in the lowered artifact (what ``keep`` lists)."""
    op: str
    module: str
    """The PyTorch module it came from (``encoder.layer.0.output.dense``), or ''."""
    shape: tuple[int, ...]
    """Its weight's shape."""


Feeds = Sequence[Mapping[str, np.ndarray]]
"""Input batches: input name → array (calibration inputs)."""
Run = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
"""A model run: inputs → outputs by name."""


class Quantizer(Protocol):
    """A target's fp32 lowering, open for quantizing layer by layer (``QuantizingBackend.quantizer``).

    ``layers`` lists what ``precision`` can rewrite; ``trial`` returns a callable running the model
    with every layer quantized except those in ``keep`` (``only``: just those), measured by the layer
    search; ``write`` writes the chosen one into the artifact directory and returns its lowering.
    ``calibration`` feeds give schemes that need them their activation ranges.
    """

    layers: Sequence[Layer]

    def trial(self, keep: Collection[str], calibration: Feeds, only: Collection[str] | None = None) -> Run: ...

    def write(self, keep: Collection[str], calibration: Feeds) -> Lowered: ...


@runtime_checkable
class QuantizingBackend(Protocol):
    """A target that quantizes its fp32 lowering (``Capabilities.precisions`` says ``quantize``).

    Given a request in such a precision, ``lower`` returns the fp32 lowering it quantizes: written
    into the directory, or held in ``Lowered.pending`` where writing it first would be wasted work
    (a compile); ``quantizer`` opens it (``scratch``: a directory for its trials, deleted after).
    """

    def quantizer(self, lowered: Lowered, directory: Path, precision: str, scratch: Path) -> Quantizer: ...
