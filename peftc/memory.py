"""Handing freed heap memory back to the operating system.

glibc's malloc keeps the pages of freed blocks inside the process (its heaps shrink only from the top),
so a buffer freed early in a compile keeps counting in the process's resident set: onnxruntime reads a
model file through buffers of nearly half the weights' size and frees them once the session is built.
:func:`trim` asks malloc to return such pages (``malloc_trim(0)``); the CLI's peak memory is what it
shows (``benchmarks/rss.py``). Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


def trim() -> None:
    """Return the free pages of malloc's heaps to the operating system, where the C library can."""
    release = _malloc_trim()
    if release is not None:
        release(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
