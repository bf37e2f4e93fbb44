"""peftc's temporary directories beside an output, and removing the ones a killed run left behind.

A compile builds its artifact in ``.NAME.peftc-XXXXXXXX/`` beside the output ``NAME``. Each such
directory holds a marker file, written when it is created and locked (``flock``) for as long as the
process that made it runs: the kernel drops the lock when that process ends, even by SIGKILL. A
directory is *stale*, and removed by the next compile to the same output or by ``peftc clean``, only
if its name has that pattern, it holds the marker with peftc's text, and nobody holds the lock; or
if it has that name and is empty, unchanged for a minute (a removal cut short after the marker went).
Nothing else is ever removed. An output name too long to leave room for the prefix and suffix is cut
to :data:`STEM_BYTES` in the temporary directory's name (so a 250-byte name is taken; a digest of the
whole name keeps two such names apart), and one longer than its file system allows is refused before
any work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from peftc.errors import InputError

MARKER = ".peftc-temp"
MARKER_TEXT = "peftc temporary directory: `peftc clean` removes it once the run that made it has ended\n"
EMPTY_AGE = 60.0
"""Seconds after which an empty directory named like a temporary one (without its marker) is stale."""
STEM_BYTES = 200
"""The most bytes of the output's name in a temporary directory's name (a file system's limit is 255)."""
_NAME = re.compile(r"^\.(?P<output>.+)\.peftc-[A-Za-z0-9_]+$")


class TempDir:
    """A marked, locked temporary directory ``.NAME.peftc-XXXXXXXX`` in ``parent``."""

    def __init__(self, parent: Path, output_name: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f".{_stem(output_name)}.peftc-", dir=parent))
        marker = self.path / MARKER
        marker.write_text(MARKER_TEXT)
        self._lock: int | None = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def remove(self) -> None:
        """Delete the directory and drop the lock (idempotent)."""
        _remove_marked(self.path)
        self.release()

    def release(self) -> None:
        """Drop the lock (what the end of the process does)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def staging(target: Path, name: str, label: str) -> tuple[TempDir, Path]:
    """A fresh :class:`TempDir` beside ``target`` holding an empty directory ``name``, after creating
    ``target``'s parent and removing stale temporary directories left beside it.

    Raises:
        InputError: the parent cannot be written (``label`` names what the user gave).
    """
    parent = target.parent
    size = len(os.fsencode(target.name))
    if size > STEM_BYTES and size > (limit := _name_max(parent)):
        raise InputError(f"{label}: its name is {size} bytes long; the file system takes names of at most {limit}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(stale_beside(target))
        directory = TempDir(parent, target.name)
        (directory.path / name).mkdir()
    except OSError as e:
        raise InputError(f"{label}: cannot write to {parent} ({e.strerror or e})") from e
    return directory, directory.path / name


def is_stale(path: Path) -> bool:
    """``path`` is a peftc temporary directory whose run has ended (see the module docstring)."""
    try:
        info = path.lstat()
        if not _NAME.match(path.name) or not stat.S_ISDIR(info.st_mode):
            return False
        fd = os.open(path / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        # Empty and unchanged for a while: a removal cut short between its last two steps (the
        # marker went, the directory stayed). A new run writes its marker right after creating it.
        with contextlib.suppress(OSError):
            return _NAME.match(path.name) is not None and _empty(path) and time.time() - info.st_mtime > EMPTY_AGE
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.read(fd, len(MARKER_TEXT) + 1) != MARKER_TEXT.encode():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a running peftc holds it
        return True
    finally:
        os.close(fd)


def stale_beside(output: Path) -> list[Path]:
    """The stale temporary directories of the output ``output`` (in its parent directory)."""
    return [p for p in _entries(output.parent) if _output_name(p) == _stem(output.name) and is_stale(p)]


def remove_stale(paths: list[Path]) -> list[Path]:
    """Remove each of ``paths`` still stale now; return those removed."""
    removed = []
    for path in paths:
        if is_stale(path):
            _remove_marked(path)
            if not os.path.lexists(path):
                removed.append(path)
    return removed


def clean(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the stale temporary directories of the output ``target`` and, if ``target`` is a
    directory, those inside it. Returns what was removed.

    Raises:
        InputError: neither ``target`` nor its parent directory exists.
    """
    target = Path(os.path.abspath(target))
    if not target.parent.is_dir() and not target.is_dir():
        raise InputError(f"{target}: no such directory")
    found = stale_beside(target) if target.name else []
    if target.is_dir() and not target.is_symlink():
        found += [p for p in _entries(target) if is_stale(p)]
    return remove_stale(found)


def _remove_marked(path: Path) -> None:
    """Remove a temporary directory, its marker last and only once the rest is gone: a directory
    whose removal failed or was cut short is still recognised as peftc's and removed by the next run."""
    with contextlib.suppress(OSError):
        with os.scandir(path) as it:
            entries = [entry for entry in it if entry.name != MARKER]
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / MARKER)
        os.rmdir(path)


def _empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _stem(name: str) -> str:
    """``name`` as it appears in a temporary directory's name: at most :data:`STEM_BYTES` bytes (a longer
    one cut, with a digest of the whole, so two long names that share a beginning stay apart)."""
    raw = os.fsencode(name)
    if len(raw) <= STEM_BYTES:
        return name
    return raw[: STEM_BYTES - 9].decode("utf-8", "ignore") + "~" + hashlib.sha256(raw).hexdigest()[:8]


def _name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of ``directory`` (or its nearest existing parent) takes."""
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _output_name(path: Path) -> str | None:
    match = _NAME.match(path.name)
    return match.group("output") if match else None


def _entries(directory: Path) -> list[Path]:
    with contextlib.suppress(OSError), os.scandir(directory) as it:
        return [Path(e.path) for e in it if e.name.startswith(".") and ".peftc-" in e.name]
    return []
