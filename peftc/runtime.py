"""Running compiled artifacts from production code: ``runner = peftc.load(out); runner(**inputs)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peftc.artifact import Manifest, check_files, read_manifest
from peftc.backends import get_backend
from peftc.errors import InputError


class Runner:
    """A loaded artifact. Call it with the model's inputs as keyword arguments.

    Inputs may be numpy arrays or torch tensors; outputs come back as a dict keyed by output name,
    as torch tensors if any input was a tensor, else as numpy arrays. Safe to call from several
    threads.
    """

    def __init__(self, path: Path, manifest: Manifest, backend_runner: Any) -> None:
        self.path = path
        self.manifest = manifest
        self.backend_runner = backend_runner
        self.input_names: list[str] = list(backend_runner.input_names)
        self.output_names: list[str] = list(backend_runner.output_names)

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        as_torch = False
        feeds: dict[str, np.ndarray] = {}
        for name, value in inputs.items():
            if hasattr(value, "detach") and hasattr(value, "numpy"):
                as_torch = True
                value = value.detach().cpu().numpy()
            feeds[name] = np.asarray(value)
        outputs = self.backend_runner.run(feeds)
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
    backend = get_backend(name)
    return Runner(path, manifest, backend.load(path, manifest.target))


def describe(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The validated manifest of the artifact at ``path`` as a dict (no files are opened)."""
    import dataclasses

    return dataclasses.asdict(read_manifest(path))
