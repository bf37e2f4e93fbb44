"""The artifact manifest: one JSON file that describes and reproduces a compiled artifact.

It records what went in (model and adapter files with sha256, every config field honoured or
ignored), what ran (passes with options, stats, skipped sites and seconds), what came out (files with
sha256, input/output names, dtypes and dynamic dims), how it was checked (the verification table),
what was not run and why, and the command that rebuilds it. ``peftc.load`` validates it and the file
hashes before running anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from peftc.artifact import schema
from peftc.artifact.files import inside, records
from peftc.errors import InputError
from peftc.hashing import sha256_file
from peftc.reading import read_json
from peftc.seeds import check_seed

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MANIFEST_LIMIT = 64 << 20
"""Largest manifest read (bytes)."""
MANIFEST_DEPTH = 64
"""Deepest JSON nesting read in a manifest."""


@dataclasses.dataclass
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring)."""

    schema_version: int
    status: str
    """``ok``, or ``failed`` for an artifact kept with ``--keep-failed``."""
    created: str
    peftc_version: str
    versions: dict[str, str]
    command: list[str] | None
    workdir: str
    options: dict[str, Any]
    model: dict[str, Any]
    adapters: list[dict[str, Any]]
    pipeline: list[dict[str, Any]]
    target: dict[str, Any]
    verification: dict[str, Any]
    not_run: list[dict[str, str]]
    timings: dict[str, float]
    warnings: list[str]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Validate and build. Raises :class:`InputError` naming the first bad field."""
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"{where}: schema_version {version!r}; this peftc reads version {SCHEMA_VERSION}")
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                raise InputError(f"{where}: missing field {field.name!r}")
            value = data[field.name]
            expected = _JSON_TYPES[field.name]
            if not isinstance(value, expected):
                raise InputError(f"{where}: field {field.name!r} should be {_type_names(expected)}")
            kwargs[field.name] = _fields(value, where, field.name)
        if kwargs["status"] not in ("ok", "failed"):
            raise InputError(f"{where}: status {kwargs['status']!r} is not 'ok' or 'failed'")
        files = kwargs["target"].get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and {"path", "sha256"} <= set(f) for f in files):
            raise InputError(f"{where}: target.files should list {{path, sha256}} entries")
        for name, expected in schema.SCHEMA.items():
            schema.check(kwargs[name], expected, where, name)
        check_seed(kwargs["options"].get("seed", 0), f"{where}: options.seed")
        return cls(**kwargs)


_JSON_TYPES: dict[str, Any] = {
    "schema_version": int, "status": str, "created": str, "peftc_version": str, "versions": dict,
    "command": (list, type(None)), "workdir": str, "options": dict, "model": dict, "adapters": list,
    "pipeline": list, "target": dict, "verification": dict, "not_run": list, "timings": dict,
    "warnings": list,
}  # fmt: skip


class Fields(dict):
    """A JSON object of a manifest: reading a field it lacks is an :class:`InputError` naming the file and
    the field's path (an edited manifest, or one from another peftc), not a ``KeyError``."""

    where = MANIFEST_FILE
    path = ""

    def __missing__(self, key: Any) -> Any:
        field = f"{self.path}.{key}" if self.path else str(key)
        raise InputError(f"{self.where}: missing field {field!r}; the manifest was edited or written by another peftc")


def _fields(value: Any, where: str, path: str) -> Any:
    """``value`` with every JSON object in it a :class:`Fields` that knows its path."""
    if isinstance(value, list):
        return [_fields(item, where, f"{path}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, dict):
        return value
    fields = Fields((key, _fields(item, where, f"{path}.{key}")) for key, item in value.items())
    fields.where, fields.path = where, path
    return fields


def _type_names(expected: Any) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A compiled artifact on disk."""

    path: Path
    manifest: Manifest


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``directory/manifest.json``."""
    path = Path(directory) / MANIFEST_FILE
    if not Path(directory).is_dir():
        raise InputError(f"{directory}: not an artifact directory")
    if not path.is_file():
        raise InputError(f"{path}: missing; {directory} is not a peftc artifact")
    data, _ = read_json(path, limit=MANIFEST_LIMIT, depth=MANIFEST_DEPTH)
    return Manifest.from_dict(data, str(path))


def file_record(path: Path, directory: Path) -> dict[str, Any]:
    """``{path, bytes, sha256}`` of a file inside the artifact directory."""
    return {"path": str(path.relative_to(directory)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def check_files(directory: str | Path, manifest: Manifest) -> None:
    """Every file the manifest lists is a regular file inside the artifact with the recorded sha256.

    Raises:
        InputError: the first of :func:`file_problems`.
    """
    problems = file_problems(directory, manifest)
    if problems:
        raise InputError(problems[0])


def file_problems(directory: str | Path, manifest: Manifest) -> list[str]:
    """One line per listed file that is not as recorded: a path that is absolute, uses ``..`` or a
    symbolic link; a missing file; a file whose sha256 differs (the artifact was modified)."""
    problems = []
    for relative, digest in records(manifest.target).items():
        try:
            path = inside(directory, relative)
        except InputError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from the manifest; the artifact was modified")
    return problems
