"""Handing memory the compile no longer needs back to the operating system.

glibc's malloc keeps the pages of freed blocks inside the process (its heaps shrink only from the top),
so a buffer freed early in a compile keeps counting in the process's resident set: onnxruntime reads a
model file through buffers of nearly half the weights' size and frees them once the session is built.
:func:`trim` asks malloc to return such pages (``malloc_trim(0)``).

A model loaded from safetensors keeps its weights as pages of the file (transformers maps it): they count
in the resident set while they are mapped in, although the kernel can read them again at any time.
:func:`page_out` hands such pages back (``madvise(MADV_PAGEOUT)``) when the weights are idle for a
while, e.g. while onnxruntime builds its own copy of them after the eager oracles have run; a later
access reads them from the file again, with the same bytes. Anonymous memory (a merged weight, a
module built in Python) is never paged out. The CLI's peak memory is what both show
(``benchmarks/rss.py``). Elsewhere (macOS, musl, kernels before 5.4) they do nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

MADV_PAGEOUT = 21
"""Linux's ``madvise`` advice that reclaims the pages of a range (file pages are dropped, not written)."""


COLLECT_BYTES = 64 * 1024**2
"""Weights from which :func:`collect` runs the garbage collector: below, dropped graphs' reference cycles
are left to it (a collection costs a compile of a tiny model more than their bytes are worth)."""


def collect(weight_bytes: int) -> None:
    """Free the reference cycles of dropped graphs (an ONNX model, an exported program) and the weights
    they hold now, then :func:`trim`, when the model's weights are ``weight_bytes`` >= :data:`COLLECT_BYTES`."""
    if weight_bytes >= COLLECT_BYTES:
        gc.collect()
        trim()


def trim() -> None:
    """Return the free pages of malloc's heaps to the operating system, where the C library can."""
    release = _libc_function("malloc_trim")
    if release is not None:
        release(0)


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: blocks of at least this size get a mapping of their own."""


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """Have malloc give every block of ``threshold`` bytes or more a mapping of its own, unmapped when it is
    freed (``mallopt(M_MMAP_THRESHOLD)``). glibc raises that threshold by itself up to 32 MiB after such
    a block is freed, and blocks below it come from the heap, whose freed pages stay in the process until
    :func:`trim`: onnxruntime, building a session, frees and allocates buffers of a weight's size, and the
    peak of a session's build varied by 80 MiB (BERT-base) with that order. Process-wide and permanent,
    so only the CLI sets it, for its own process."""
    setting = _libc_function("mallopt")
    if setting is not None:
        setting(M_MMAP_THRESHOLD, threshold)


def page_out(tensors: Iterable[Any]) -> int:
    """Hand back the resident pages of ``tensors`` (torch tensors) that are mapped from a file; return how
    many bytes were advised. Their values are unchanged: the pages are read from the file when touched."""
    advise = _libc_function("madvise") if sys.platform.startswith("linux") else None
    if advise is None:
        return 0
    advise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, mapped = os.sysconf("SC_PAGE_SIZE"), file_mappings()
    starts = [start for start, _ in mapped]
    done, seen = 0, set()
    for tensor in tensors:
        storage = tensor.untyped_storage()
        begin, size = storage.data_ptr(), storage.nbytes()
        if begin in seen or not size or storage.device.type != "cpu":
            continue
        seen.add(begin)
        index = bisect.bisect_right(starts, begin) - 1
        if index < 0 or begin + size > mapped[index][1]:
            continue  # anonymous memory, or not wholly inside one file mapping
        first, last = -(-begin // page) * page, (begin + size) // page * page
        if last > first and advise(first, last - first, MADV_PAGEOUT) == 0:
            done += last - first
    return done


def program_tensors(program: Any) -> list[Any]:
    """The tensors of an exported program: its weights and constants (script objects aside)."""
    values = [*program.state_dict.values(), *program.constants.values()]
    return [v for v in values if hasattr(v, "untyped_storage")]


def file_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of each mapping of a file in this process, in address order (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            out.append((int(start, 16), int(end, 16)))
    return sorted(out)


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None
