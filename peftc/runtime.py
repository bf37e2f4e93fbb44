"""Running compiled artifacts from production code: ``runner = peftc.load(out); runner(**inputs)``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftc.artifact import Manifest, check_files, read_manifest
from peftc.artifact.files import listed, records
from peftc.backends import Backend, get_backend
from peftc.errors import InputError, UnsupportedError
from peftc.swap.runtime import SwappableRunner

_DEFAULT = object()


class Runner:
    """A loaded artifact. Call it with the model's inputs as keyword arguments.

    Inputs may be numpy arrays or torch tensors; outputs come back as a dict keyed by output name,
    as torch tensors if any input was a tensor, else as numpy arrays. Safe to call from several
    threads.

    Swappable artifacts (``peftc compile --swappable``) hold several adapters: ``runner.adapters``
    lists them, ``runner(**inputs, adapter="name")`` runs one (``None``: the base model), a list
    gives one adapter per batch row (artifacts compiled with ``--multi-adapter``), and
    ``runner.set_adapter(name)`` sets the default for calls that name none. Calls share no state
    beyond that default, so concurrent calls with different ``adapter=`` are safe.
    """

    def __init__(self, path: Path, manifest: Manifest, backend_runner: Any) -> None:
        self.path = path
        self.manifest = manifest
        self.backend_runner = backend_runner
        self.input_names: list[str] = list(backend_runner.input_names)
        self.output_names: list[str] = list(backend_runner.output_names)
        self._swappable = "slots" in manifest.target
        self._default: str | None = manifest.target.get("default_adapter")

    @property
    def adapters(self) -> list[str]:
        """The adapters this artifact holds (for a merged artifact: the ones merged into it)."""
        return [a["name"] for a in self.manifest.adapters]

    @property
    def adapter(self) -> str | None:
        """The adapter calls use when they name none (None: the base model)."""
        return self._default

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` (None: the base model) the default adapter of this runner.

        Raises:
            UnsupportedError: the artifact is not swappable (its adapters are compiled in).
            InputError: no adapter of that name.
        """
        self._default = self._check_adapter(name)

    def _check_adapter(self, name: str | None) -> str | None:
        if not self._swappable:
            raise UnsupportedError(
                f"{self.path}: adapters are compiled into this artifact; compile with --swappable to switch them"
            )
        if name is not None and name not in self.adapters:
            known = ", ".join(repr(a) for a in self.adapters) or "none"
            raise InputError(f"{self.path}: no adapter named {name!r} (adapters: {known})")
        return name

    def __call__(self, adapter: Any = _DEFAULT, **inputs: Any) -> dict[str, Any]:
        as_torch = False
        feeds: dict[str, np.ndarray] = {}
        for name, value in inputs.items():
            if hasattr(value, "detach") and hasattr(value, "numpy"):
                as_torch = True
                value = value.detach().cpu().numpy()
            feeds[name] = np.asarray(value)
        if adapter is _DEFAULT:
            outputs = (
                self.backend_runner.run(feeds, adapter=self._default)
                if self._swappable
                else self.backend_runner.run(feeds)
            )
        else:
            for name in adapter if isinstance(adapter, (list, tuple)) else [adapter]:
                self._check_adapter(name)
            outputs = self.backend_runner.run(feeds, adapter=adapter)
        if as_torch:
            import torch

            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in outputs.items()}
        return outputs

    def __repr__(self) -> str:
        return f"Runner({str(self.path)!r}, target={self.manifest.target['name']!r}, inputs={self.input_names})"


def load(path: str | os.PathLike[str], *, allow_failed: bool = False, runtime: str | None = None) -> Runner:
    """Load the artifact at ``path`` after validating its manifest and file hashes.

    Args:
        runtime: run the artifact with another target's runtime that reads its files, when the
            manifest lists it in ``target.runnable_with`` (e.g. ``"onnx"``: the verified ONNX inside a
            ``trt`` artifact, with onnxruntime). Never chosen implicitly.

    Raises:
        InputError: not an artifact, a manifest that does not validate, a file whose sha256 differs,
            an artifact that failed verification (unless ``allow_failed``), or a ``runtime`` the
            artifact cannot be run with.
        BackendUnavailable: the target's runtime cannot run here (e.g. a TensorRT artifact built
            without a GPU has no engine; the message says how to run its ONNX).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.status != "ok" and not allow_failed:
        raise InputError(f"{path}: this artifact failed verification (kept with --keep-failed); refusing to run it")
    check_files(path, manifest)
    name = manifest.target["name"]
    if runtime is not None and runtime != name:
        allowed = manifest.target.get("runnable_with", [])
        if runtime not in allowed:
            raise InputError(f"{path}: a {name!r} artifact cannot be run with {runtime!r} (it can with {allowed})")
        name = runtime
    return Runner(path, manifest, open_runner(get_backend(name), path, manifest.target, manifest.adapters))


def open_runner(
    backend: Backend, directory: Path, target: Mapping[str, Any], adapters: Sequence[Mapping[str, Any]]
) -> Any:
    """The target's runner of the artifact in ``directory``; a swappable artifact's, wrapped so that
    calls choose adapters (``peftc/swap/runtime.py``).

    Args:
        target: the manifest's ``target`` record.
        adapters: the manifest's adapter entries (their ``slot_file``).
    """
    runner = backend.load(directory, target)
    if "slots" not in target:
        return runner
    digests = records(target)
    files = {
        a["name"]: (listed(directory, target, a["slot_file"]), digests[a["slot_file"]])
        for a in adapters
        if "slot_file" in a
    }
    return SwappableRunner(runner, target, files)


def describe(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The validated manifest of the artifact at ``path`` as a dict (no files are opened)."""
    import dataclasses

    return dataclasses.asdict(read_manifest(path))
