"""The base model and adapters an artifact's manifest names, loaded again and checked against it.

``peftc verify`` rebuilds the oracles from them and ``peftc add-adapter`` parses a new adapter
against the same base; both refuse sources whose sha256 changed since the compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftc.artifact import Manifest
from peftc.driver.build import Sources
from peftc.errors import InputError
from peftc.hashing import sha256_file
from peftc.loaders import LoadedModel, load_model


def model_spec(manifest: Manifest, model: Any = None) -> Any:
    """What to load as the base: ``model`` if given, else the manifest's spec (relative to its workdir)."""
    spec = model if model is not None else manifest.model["spec"]
    if isinstance(spec, str) and spec.startswith("<"):
        raise InputError("the artifact was built from an in-memory model; pass that model (model=...)")
    if isinstance(spec, str) and not Path(spec).is_absolute() and (Path(manifest.workdir) / spec).exists():
        spec = str(Path(manifest.workdir) / spec)  # a path relative to where the artifact was built
    return spec


def load_base(manifest: Manifest, model: Any = None) -> LoadedModel:
    """The artifact's base model, loaded again (not traced), its files checked against the manifest.

    Raises:
        InputError: the model cannot be loaded, or a file it was read from changed since the compile.
    """
    loaded = load_model(
        model_spec(manifest, model), inputs=manifest.options.get("inputs", []), workdir=manifest.workdir
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
        base_residual=manifest.options.get("base_residual", False),
        names=tuple(a["name"] for a in manifest.adapters),
        workdir=manifest.workdir,
    )
