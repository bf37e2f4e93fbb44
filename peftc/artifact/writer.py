"""Writing an artifact directory atomically, replacing only what the user allowed.

Files are written into a marked temporary directory beside the destination
(``.NAME.peftc-XXXXXXXX/artifact``, ``peftc.artifact.temp``), which becomes the destination only
when :meth:`ArtifactWriter.commit` runs, after verification. What is at the destination is checked
twice, when the compile starts and again at commit (a directory may appear in between):

* nothing: the directory is moved there, and the move fails if something appeared meanwhile;
* something, without ``force``: refused, and left untouched;
* with ``force``: replaced only if it is a peftc artifact (a directory with a peftc ``manifest.json``)
  or an empty directory, and not the model's or an adapter's own files; old and new trade places in
  one step (``peftc.artifact.rename.exchange``), so the destination always holds one of them.

A failed, interrupted or killed compile leaves at most its temporary directory, which the next
compile to the same destination (or ``peftc clean``) removes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from peftc.artifact import rename
from peftc.artifact.manifest import MANIFEST_FILE, Manifest
from peftc.artifact.temp import staging
from peftc.errors import InputError

_MANIFEST_BYTES = 64 << 20
"""A ``manifest.json`` larger than this is not read when deciding whether a directory is an artifact."""


class ArtifactWriter:
    """A temporary directory that becomes ``out`` on commit.

    Args:
        out: the destination directory.
        force: allow replacing a peftc artifact or an empty directory at ``out``.
        inputs: files and directories the compile reads (model, adapters…), which ``out`` must not be,
            contain, or lie inside of when it may be replaced.
    """

    def __init__(self, out: str | os.PathLike[str], *, force: bool = False, inputs: Sequence[Path] = ()) -> None:
        self.out = Path(out)
        self.force = force
        self.inputs = tuple(Path(p) for p in inputs)
        self._target = Path(os.path.abspath(self.out))
        self._check_place()
        if os.path.lexists(self._target):
            if not force:
                raise InputError(f"{self.out}: already exists; pass --force to replace it")
            self._check_replaceable()
        elif force:
            self._check_inputs()
        self._dir, self.tmp = staging(self._target, "artifact", str(self.out))
        self.committed = False

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest and move the directory into place (see the module docstring).

        Raises:
            InputError: something that may not be replaced is at ``out`` now; it is left untouched.
        """
        (self.tmp / MANIFEST_FILE).write_text(manifest.to_json())
        if rename.place_if_absent(self.tmp, self._target):
            return self._done()
        if not self.force:
            raise InputError(f"{self.out}: appeared while compiling; left untouched (pass --force to replace it)")
        self._check_replaceable()
        rename.exchange(self.tmp, self._target, self._dir.path / "old")
        return self._done()

    def abort(self) -> None:
        """Remove the temporary directory (after commit: the replaced artifact it holds)."""
        self._dir.remove()

    def _done(self) -> Path:
        self.committed = True
        self._dir.remove()
        return self.out

    def _check_place(self) -> None:
        check_place(self.out)

    def _check_replaceable(self) -> None:
        """``out`` exists: it is a peftc artifact or an empty directory, and no input of the compile."""
        try:
            mode = self._target.lstat().st_mode
        except OSError as e:
            raise InputError(f"{self.out}: cannot read it ({e.strerror or e})") from e
        if stat.S_ISLNK(mode):
            raise InputError(f"{self.out}: is a symbolic link; give the directory itself as -o")
        if not stat.S_ISDIR(mode):
            raise InputError(f"{self.out}: exists and is not a directory")
        self._check_inputs()
        manifest = _artifact_manifest(self._target)
        if manifest is None and any(self._target.iterdir()):
            raise InputError(
                f"{self.out}: not a peftc artifact and not empty; --force replaces only those (remove it yourself)"
            )
        unlisted = _unlisted(self._target, manifest) if manifest is not None else []
        if unlisted:
            raise InputError(
                f"{self.out}: holds {unlisted[0]!r}, which its manifest does not list; --force replaces only what "
                "peftc wrote (move that file away first)"
            )

    def _check_inputs(self) -> None:
        check_inputs(self.out, self.inputs)


def check_place(out: Path, flag: str = "-o") -> None:
    """``out`` is neither the current directory nor above it (nor a path without a name, like ``/``)."""
    absolute = Path(os.path.abspath(out))
    target = Path(os.path.realpath(absolute))
    cwd = Path(os.path.realpath(Path.cwd()))
    if not absolute.name or target == cwd or target in cwd.parents:
        raise InputError(f"{out}: is the current directory or above it; give a new directory as {flag}")


def check_inputs(out: Path, inputs: Sequence[Path], flag: str = "-o", command: str = "compile") -> None:
    """``out`` is not one of ``inputs``, does not hold one, and does not lie inside an input directory."""
    target = Path(os.path.realpath(os.path.abspath(out)))
    for given in inputs:
        source = Path(os.path.realpath(given))
        if target == source or target in source.parents or (source.is_dir() and source in target.parents):
            raise InputError(f"{out}: is, holds or lies inside the {command}'s input {given}; choose another {flag}")


def _artifact_manifest(directory: Path) -> dict | None:
    """The manifest of a peftc artifact at ``directory`` (any schema version or status), else None."""
    path = directory / MANIFEST_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = f.read(_MANIFEST_BYTES + 1)
    try:
        data = json.loads(text) if len(text) <= _MANIFEST_BYTES else None
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and "peftc_version" in data and "schema_version" in data else None


def _unlisted(directory: Path, manifest: dict) -> list[str]:
    """Files under ``directory`` that are neither its manifest nor listed in ``target.files`` (a user's own)."""
    target = manifest.get("target")
    files = target.get("files") if isinstance(target, dict) else None
    listed = {f.get("path") for f in files if isinstance(f, dict)} if isinstance(files, list) else set()
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != MANIFEST_FILE and relative not in listed and not _peftc_own(relative):
                found.append(relative)
    return sorted(found)


def _peftc_own(relative: str) -> bool:
    """A file a killed ``add-adapter``/``remove-adapter`` may leave: its temporary files (``.peftc-tmp`` in
    the name) and an adapter file moved into ``adapters/`` before the manifest listed it."""
    parts = relative.split(os.sep)
    return ".peftc-tmp" in parts[-1] or (
        len(parts) == 2 and parts[0] == "adapters" and parts[1].endswith((".onnx_adapter", ".safetensors"))
    )
