"""Choosing slot values per call: adapter banks for mixed-adapter batches, and adapter files read once
(numpy only, no torch).

A call names one adapter per batch row (or one for all, or None for the base). With a bank, the
runtime puts the adapters the call uses into bank rows 1…k (row 0 is the base, all zeros) and feeds
each batch row's bank row as ``adapter_index``.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from peftc.artifact.files import read_verified
from peftc.errors import InputError, UnsupportedError
from peftc.hashing import sha256_file

T = TypeVar("T")
Choice = str | Sequence[str | None] | None
"""``adapter=`` of a call: a name, None (the base model), or one of those per batch row."""


def rows(adapter: Choice, batch: int, size: int) -> tuple[tuple[str, ...], np.ndarray]:
    """The adapters a call uses, in bank order, and the bank row of every batch row.

    Raises:
        InputError: a per-row list of the wrong length, or more adapters than the bank holds.
    """
    chosen = [adapter] * batch if adapter is None or isinstance(adapter, str) else list(adapter)
    if len(chosen) != batch:
        raise InputError(f"adapter= lists {len(chosen)} names for a batch of {batch} rows")
    used = tuple(dict.fromkeys(r for r in chosen if r is not None))
    if len(used) > size - 1:
        raise InputError(
            f"{len(used)} adapters in one call, but the artifact's bank holds {size - 1} (--multi-adapter)"
        )
    index = np.array([0 if r is None else used.index(r) + 1 for r in chosen], dtype=np.int64)
    return used, index


def single(adapter: Choice) -> str | None:
    """The one adapter of a call to an artifact without a bank (a per-row list must name one).

    Raises:
        InputError: an empty list.
        UnsupportedError: the rows name different adapters.
    """
    if adapter is None or isinstance(adapter, str):
        return adapter
    if not adapter:
        raise InputError("adapter= is an empty list; give one adapter (or None) per batch row")
    if len(set(adapter)) > 1:
        raise UnsupportedError(
            "this artifact has no adapter bank: one adapter per call (compile with --multi-adapter N to mix "
            "adapters in one batch)"
        )
    return adapter[0]


def stack(
    zeros: Mapping[str, np.ndarray], names: Mapping[str, str], values: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Banks from per-adapter slot values: every bank tensor, zero but in rows 1, 2, ….

    Args:
        zeros: bank tensor name → an all-zero bank (``[size, *slot shape]``).
        names: bank tensor name → the slot name adapter files use for it.
        values: slot values of the adapters in bank rows 1, 2, … (slot name → array).
    """
    banks = {}
    for bank, slot in names.items():
        stacked = zeros[bank].copy()
        for row, adapter in enumerate(values, start=1):
            stacked[row] = adapter[slot]
        banks[bank] = stacked
    return banks


class AdapterFiles:
    """A swappable artifact's adapter files by name, each read at most once per reader, thread-safe.

    Each file is pinned to a sha256 (the manifest's, or the file's when it is registered) and checked
    when it is read: the reader gets a private copy of exactly the bytes that were checked.
    """

    def __init__(self, files: Mapping[str, tuple[str | Path, str]] | None = None) -> None:
        self._files = {name: (Path(path), digest) for name, (path, digest) in (files or {}).items()}
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def register(self, name: str, path: str | Path) -> None:
        """Make the file at ``path`` adapter ``name`` (replacing what was read for that name), pinned to
        the file's sha256 now."""
        with self._lock:
            self._files[name] = (Path(path), sha256_file(Path(path)))
            self._cache = {k: v for k, v in self._cache.items() if k[0] != name}

    def read(self, name: str, kind: str, reader: Callable[[Path], T]) -> T:
        """``reader(a private copy of name's file)``, checked against its sha256, cached per ``(name, kind)``.

        Raises:
            InputError: no adapter of that name, or its file changed since it was listed.
        """
        with self._lock:
            if (name, kind) not in self._cache:
                entry = self._files.get(name)
                if entry is None:
                    known = ", ".join(repr(n) for n in self._files) or "none"
                    raise InputError(f"no adapter named {name!r} in this artifact (adapters: {known})")
                path, digest = entry
                data = read_verified(path, digest)
                with tempfile.TemporaryDirectory(prefix="peftc-adapter-") as private:
                    copy = Path(private) / path.name
                    copy.write_bytes(data)
                    self._cache[name, kind] = reader(copy)
            return self._cache[name, kind]
