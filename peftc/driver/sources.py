"""The base model and adapters an artifact's manifest names, loaded again and checked against it.

``peftc verify`` rebuilds the oracles from them and ``peftc add-adapter`` parses a new adapter
against the same base; both refuse sources whose sha256 changed since the compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftc.artifact import MANIFEST_FILE, Manifest
from peftc.artifact.files import inside
from peftc.driver.build import Sources
from peftc.errors import InputError
from peftc.hashing import sha256_file
from peftc.loaders import LoadedModel, load_model
from peftc.loaders.timm_models import TIMM_PREFIX, parse_timm_spec


def model_spec(manifest: Manifest, model: Any = None) -> Any:
    """What to load as the base: ``model`` if given (the caller's choice), else the manifest's spec.

    A manifest is data written by whoever built the artifact, so its spec is taken only when it names
    data: a Hugging Face model directory or a ``.pt2`` file, whose files are checked against the
    recorded sha256 *before* anything is loaded, or ``timm:NAME@WEIGHTS.safetensors``. A Python
    factory or file (``pkg.module:fn``, ``file.py:fn``) is refused: peftc never runs code an artifact names.

    Raises:
        InputError: an in-memory or code model, a spec that names nothing loadable, or a changed file.
    """
    if model is not None:
        return model
    spec = manifest.model["spec"]  # a missing field is reported with its path
    if not isinstance(spec, str) or not spec:
        raise InputError(f"{MANIFEST_FILE}: model.spec must be a non-empty string")
    if spec.startswith("<"):
        raise InputError("the artifact was built from an in-memory model; pass that model (model=...)")
    yourself = "pass the model yourself: --model SPEC (Python: model=...)"
    if spec.startswith(TIMM_PREFIX):
        weights = parse_timm_spec(spec)[2] or ""
        if not weights.endswith(".safetensors"):
            raise InputError(f"{MANIFEST_FILE}: model {spec!r} needs pickled weights; {yourself}")
        file = Path(weights) if Path(weights).is_absolute() else Path(manifest.workdir) / weights
        _check_model_files(manifest, file)  # timm's code is the installed library's; its weights are data
        return spec
    path = Path(spec) if Path(spec).is_absolute() else Path(manifest.workdir) / spec
    if (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix == ".pt2"):
        _check_model_files(manifest, path)
        return str(path)
    raise InputError(
        f"{MANIFEST_FILE}: model {spec!r} is not a model directory or .pt2 file here; peftc never runs code "
        f"an artifact names (a Python factory or file); {yourself}"
    )


def _check_model_files(manifest: Manifest, path: Path) -> None:
    """The model files the loader reads are the ones the manifest recorded, with the same sha256."""
    recorded = manifest.model.get("files") or {}
    if path.is_dir():
        present = {"config.json", *(f.name for f in path.glob("*.safetensors"))}
        unrecorded = sorted(present - set(recorded))
        if unrecorded:
            raise InputError(f"{path / unrecorded[0]}: not among the model files the artifact was built from")
    else:
        recorded = {path.name: recorded.get(path.name)}
    for name, digest in recorded.items():
        file = inside(path, name) if path.is_dir() else path
        if not file.is_file() or sha256_file(file) != digest:
            raise InputError(f"{file}: missing or changed since the artifact was built (sha256 differs)")


def workdir(manifest: Manifest, model: Any = None) -> str | None:
    """Where relative model paths resolve: the manifest's build directory for its own spec; for a
    model the caller gives, the working directory (never a directory an artifact names)."""
    return manifest.workdir if model is None else None


def load_base(manifest: Manifest, model: Any = None) -> LoadedModel:
    """The artifact's base model, loaded again (not traced), its files checked against the manifest.

    Raises:
        InputError: the model cannot be loaded, or a file it was read from changed since the compile.
    """
    loaded = load_model(
        model_spec(manifest, model),
        inputs=manifest.options.get("inputs", []),
        workdir=workdir(manifest, model),
        task=manifest.options.get("task"),
    )
    for name, digest in manifest.model.get("files", {}).items():
        if loaded.files.get(name) not in (None, digest):
            raise InputError(f"{manifest.model['spec']}: {name} changed since the artifact was built (sha256 differs)")
    return loaded


def recorded(manifest: Manifest, model: Any = None) -> Sources:
    """The sources of the compile the manifest records, its adapter files checked first.

    Raises:
        InputError: an adapter file is gone or changed since the compile (sha256 differs).
    """
    spec = model_spec(manifest, model)
    for adapter in manifest.adapters:
        for role, key in (("config", "config_file"), ("weights", "weights_file")):
            path = Path(adapter[key])
            if not path.is_file():
                raise InputError(f"{path}: adapter {adapter['name']!r} source is gone; cannot rebuild the reference")
            if sha256_file(path) != adapter["sha256"][role]:
                raise InputError(f"{path}: changed since the artifact was built (sha256 differs)")
    return Sources(
        model=spec,
        adapters=tuple(a["path"] for a in manifest.adapters),
        configs=tuple(a["config_file"] for a in manifest.adapters),
        inputs=tuple(manifest.options.get("inputs", [])),
        task=manifest.options.get("task"),
        base_residual=manifest.options.get("base_residual", False),
        task_id=manifest.options.get("task_id"),
        names=tuple(a["name"] for a in manifest.adapters),
        workdir=workdir(manifest, model),
    )
