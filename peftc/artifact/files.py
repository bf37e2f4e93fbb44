"""The files of an artifact: what the runner may read, and reading it checked.

An artifact is data written by whoever built it: its manifest lists every file the runner reads,
each as a plain path relative to the artifact directory with its sha256. :func:`inside` accepts only
such paths (no absolute path, no ``..``, no symbolic link on the way, nothing outside the directory);
:func:`listed` hands out a file the manifest lists, and nothing else; :func:`read_verified` reads a
file's bytes once and checks them against the recorded sha256 at the moment they are used, so a file
replaced after ``peftc.load`` is refused instead of used.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from peftc.errors import InputError
from peftc.reading import read_bytes


def inside(directory: str | Path, relative: Any) -> Path:
    """``directory / relative`` for a plain relative path that stays inside ``directory``.

    Raises:
        InputError: an absolute path, ``..``, an empty or non-string path, or a symbolic link (the
            path itself or a folder on the way).
    """
    directory = Path(directory)
    text = relative if isinstance(relative, str) else None
    parts = PurePosixPath(text).parts if text else ()
    if not parts or "\\" in text or "\0" in text or PurePosixPath(text).is_absolute() or ".." in parts:
        raise InputError(f"{directory}: the manifest lists {relative!r}; files must be plain paths inside the artifact")
    path = directory
    for part in parts:
        path = path / part
        try:
            if stat.S_ISLNK(path.lstat().st_mode):
                raise InputError(f"{path}: a symbolic link; an artifact's files must be regular files inside it")
        except FileNotFoundError:
            break
    return path


def records(target: Mapping[str, Any]) -> dict[str, str]:
    """Listed path → sha256 from a manifest's ``target.files``."""
    files = target.get("files")
    if not isinstance(files, Sequence) or not all(isinstance(f, Mapping) for f in files):
        raise InputError("manifest.json: target.files must be a list of {path, bytes, sha256} records")
    return {str(f.get("path")): str(f.get("sha256")) for f in files}


def listed(directory: str | Path, target: Mapping[str, Any], name: Any) -> Path:
    """The artifact file ``name``, which the manifest must list.

    Raises:
        InputError: ``name`` is not listed in ``target.files``, or is not a plain path inside.
    """
    if name not in records(target):
        raise InputError(f"{directory}: the manifest names {name!r} but does not list it in target.files")
    return inside(directory, name)


def read_verified(path: Path, sha256: str) -> bytes:
    """The bytes of ``path``, checked against ``sha256`` (the bytes returned are the bytes hashed).

    Raises:
        InputError: missing, not a regular file, or different from what the manifest recorded.
    """
    data = read_bytes(path)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise InputError(
            f"{path}: sha256 differs from the manifest; the file was modified after the artifact was built"
        )
    return data
