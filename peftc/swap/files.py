"""Adapter files of a swappable artifact: one per adapter, holding its slot values.

An adapter file maps every slot tensor, by its single-slot name (``<module>.slot_A.slots``), to the
adapter's values packed into the slot (``peftc/swap/slots.py``: ``A`` zero-padded, ``s·B``), in
fp32, fp16, or int8 with per-row scales (``storage.py``); banks are assembled from these at run time.
The target writes it in its own format (``SlotBackend``): an onnxruntime adapter file, a safetensors
file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from peftc.backends.base import SlotBackend
from peftc.methods.base import Adapter
from peftc.swap import slots, storage
from peftc.swap.table import SlotTable

ADAPTER_DIR = "adapters"


def relative_path(backend: SlotBackend, name: str) -> str:
    """Where adapter ``name``'s file lives in the artifact directory."""
    return f"{ADAPTER_DIR}/{name}{backend.adapter_suffix}"


def slot_values(table: SlotTable, adapter: Adapter | None) -> dict[str, np.ndarray]:
    """An adapter's file contents: single-slot names → arrays (None: the base model, all zeros), stored
    as the table's ``slot_dtype`` (``storage.py``)."""
    single = dataclasses.replace(table, bank=0)
    values = {single.fqn(*key.split(":")): value.numpy() for key, value in slots.pack(table, adapter).items()}
    return storage.encode(values, table.slot_dtype)


def write_adapter_files(
    backend: SlotBackend, directory: Path, table: SlotTable, adapters: Sequence[Adapter]
) -> dict[str, str]:
    """Write one file per adapter; return adapter name → its path relative to ``directory``."""
    (directory / ADAPTER_DIR).mkdir(exist_ok=True)
    files = {}
    for adapter in adapters:
        files[adapter.name] = relative_path(backend, adapter.name)
        backend.write_adapter(directory / files[adapter.name], slot_values(table, adapter))
    return files
