"""Running compiled artifacts from production code: ``runner = peftc.load(out); runner(**inputs)``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftc import arguments
from peftc.artifact import MANIFEST_FILE, Manifest, check_files, read_manifest
from peftc.artifact.files import inside, listed, records
from peftc.backends import Backend, get_backend
from peftc.errors import InputError, UnsupportedError, first_line
from peftc.feeds import InputCheck
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

    def __init__(self, path: Path, manifest: Manifest, backend_runner: Any, runtime: str | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.backend_runner = backend_runner
        self.input_names: list[str] = list(backend_runner.input_names)
        self.output_names: list[str] = list(backend_runner.output_names)
        self._swappable = "slots" in manifest.target
        self._runtime, self._encoder = runtime, None
        self._default: str | None = manifest.target.get("default_adapter")
        own = runtime is None or runtime == manifest.target.get("name")
        self._check = InputCheck.from_target(
            manifest.target, self.input_names, engine=own, where=str(path / MANIFEST_FILE)
        )

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
        """Check ``inputs`` against the artifact's signature (``peftc/feeds.py``) and ``adapter`` against
        its adapters and the batch, then run.

        Raises:
            InputError: an input or adapter choice that does not fit, naming it (before anything runs).
            UnsupportedError: ``adapter=`` given to an artifact that is not swappable.
        """
        as_torch = any(hasattr(v, "detach") and hasattr(v, "numpy") for v in inputs.values())
        feeds, sizes = self._check({name: _numpy(name, value) for name, value in inputs.items()})
        if adapter is _DEFAULT:
            outputs = (
                self.backend_runner.run(feeds, adapter=self._default)
                if self._swappable
                else self.backend_runner.run(feeds)
            )
        else:
            outputs = self.backend_runner.run(feeds, adapter=self._check_choice(adapter, feeds, sizes))
        if as_torch:
            import torch

            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in outputs.items()}
        return outputs

    def _check_choice(self, adapter: Any, feeds: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> Any:
        """``adapter=`` of a call, checked: a known name, None, or a list of those, one per batch row."""
        if not self._swappable:
            self._check_adapter(None)  # refuses: the adapters are compiled in
        if not isinstance(adapter, (list, tuple)):
            if adapter is not None and not isinstance(adapter, str):
                raise InputError(f"adapter={adapter!r}: expected an adapter name, None, or a list of those per row")
            return self._check_adapter(adapter)
        batch = self._check.batch(feeds, sizes)
        if len(adapter) != batch:
            raise InputError(f"adapter= lists {len(adapter)} names for a batch of {batch} rows; give one per row")
        for name in adapter:
            if name is not None and not isinstance(name, str):
                raise InputError(f"adapter= lists {name!r}: expected adapter names or None")
            self._check_adapter(name)
        return list(adapter)

    def generate(self, input_ids: Any, attention_mask: Any = None, *, adapter: Any = _DEFAULT, **options: Any) -> Any:
        """Token ids: the prompt ``input_ids`` ``[batch, length]`` (left-padded, ``attention_mask`` 0 on
        padding) followed by the generated tokens, from a ``--task text-generation`` artifact; from a
        ``--task text2text-generation`` artifact, the decoder's tokens (its start token first) for the
        prompts (padded on either side; ``peftc/generation/seq2seq.py``).

        ``options``: ``max_new_tokens`` (20), ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``eos_token_id``, ``pad_token_id``, ``seed`` (``peftc/generation/decode.py``); ``adapter=`` as for
        a call, the same at every step.

        Raises:
            InputError: not a generation artifact, a prompt longer than the model's positions allow, or an
                input or adapter that does not fit.
        """
        from peftc.generation import decode, seq2seq

        if adapter is _DEFAULT and self._swappable and "generation" in self.manifest.target:
            adapter = self._default  # the encoder program's runner has its own default
        call = {} if adapter is _DEFAULT else {"adapter": adapter}
        run = seq2seq.generate if "generation" in self.manifest.target else decode.generate
        return run(self, input_ids, attention_mask, call=call, **options)

    @property
    def encoder(self) -> Runner:
        """The encoder program of a ``--task text2text-generation`` artifact (its ``encoder/`` directory).

        Raises:
            InputError: not such an artifact.
        """
        where = self.manifest.target.get("generation", {}).get("encoder")
        if not isinstance(where, str):
            raise InputError(f"{self.path}: not a text2text-generation artifact (it has no encoder program)")
        if self._encoder is None:
            self._encoder = load(inside(self.path, where), runtime=self._runtime)
        return self._encoder

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
    path, manifest, name = checked(path, allow_failed=allow_failed, runtime=runtime)
    runner = open_runner(get_backend(name), path, manifest.target, manifest.adapters)
    return Runner(path, manifest, runner, runtime=name)


def checked(
    path: str | os.PathLike[str], *, allow_failed: bool = False, runtime: str | None = None
) -> tuple[Path, Manifest, str]:
    """What :func:`load` checks before it opens the artifact at ``path``: its path, its validated manifest
    (every listed file hashed) and the name of the runtime that runs it. ``load`` documents the errors."""
    path = arguments.path(path, "path")
    arguments.flag(allow_failed, "allow_failed")
    arguments.text(runtime, "runtime", optional=True)
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
    return path, manifest, name


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


def _numpy(name: str, value: Any) -> np.ndarray:
    """Input ``name`` as a numpy array: a torch tensor (bf16 widened to fp32, which numpy lacks) or array-like.

    Raises:
        InputError: ``value`` is not a rectangular array.
    """
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu()
        return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InputError(f"input {name!r}: not an array ({first_line(e)})") from e


def describe(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The validated manifest of the artifact at ``path`` as a dict (no files are opened)."""
    import dataclasses

    return dataclasses.asdict(read_manifest(path))
