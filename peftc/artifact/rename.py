"""Atomic directory renames: swap two directories, or move one where nothing exists.

On Linux both are one ``renameat2`` system call (``RENAME_EXCHANGE``, ``RENAME_NOREPLACE``), so a
replaced artifact is never missing: the old and the new directory trade places in one step. Where
the call is unavailable (not Linux, an old C library, a file system that refuses the flag) the
fallbacks below are two renames, with a moment between them where the destination is absent, and a
check-then-rename that can race with another process; the fallbacks say so where they run.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _load_renameat2() -> Any:
    """libc's ``renameat2`` (glibc ≥ 2.28), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _call(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False when the call or flag is unsupported."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def exchange(new: Path, old: Path, spare: Path) -> None:
    """Put the directory ``new`` at ``old``, atomically swapping the two where the system can.

    Afterwards what was at ``old`` is at ``new`` (swapped), or at ``spare`` (the fallback).

    Args:
        spare: an absent path on the same file system, used only by the two-rename fallback.
    """
    if _call(new, old, _RENAME_EXCHANGE):
        return
    # Fallback without RENAME_EXCHANGE: between these two renames nothing is at ``old``.
    os.rename(old, spare)
    try:
        os.rename(new, old)
    except BaseException:
        os.rename(spare, old)
        raise


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; raise :class:`FileExistsError` if anything is at ``dst``."""
    if _call(src, dst, _RENAME_NOREPLACE):
        return
    # Fallback without RENAME_NOREPLACE: check, then rename (another process may win the race).
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def place_if_absent(src: Path, dst: Path) -> bool:
    """Move ``src`` to ``dst`` if nothing is there; False (``src`` left as it is) if something is, or
    appears just now: the caller then decides whether it may be replaced."""
    if os.path.lexists(dst):
        return False
    try:
        rename_noreplace(src, dst)
    except FileExistsError:
        return False
    return True
