"""Swappable ``text2text-generation`` artifacts: two programs, each with its own slots and adapter files.

The encoder program (``encoder/``, an artifact of its own) has slots for the modules its outputs
depend on (the encoder, the decoder's cross-attention keys and values); the decoder step for the rest
(``peftc/loaders/seq2seq.py``). An adapter is one adapter file in each program, under one name, and
a call's ``adapter=`` picks the same adapter (or one per row) in both. The decoder step's manifest
hashes the encoder's manifest and adapter files like its own.

``peftc add-adapter`` adds an adapter to the encoder program first (its keys for modules that only the
decoder step has slots for set aside as that program's), then to the decoder step, whose manifest then
records the encoder's new files; a failure in the decoder step removes it from the encoder again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftc import ir
from peftc.artifact import MANIFEST_FILE, Manifest, file_record, read_manifest
from peftc.artifact.files import inside
from peftc.loaders import seq2seq
from peftc.swap.table import SlotTable


def encoder_of(directory: Path, manifest: Manifest) -> Path | None:
    """The encoder program's directory of a ``text2text-generation`` artifact, else None."""
    where = manifest.target.get("generation", {}).get("encoder")
    return inside(directory, where) if isinstance(where, str) else None


def other_tables(manifest: Manifest, other: Manifest) -> tuple[SlotTable, SlotTable]:
    """The slot tables of a program and of the other program."""
    return SlotTable.from_json(manifest.target["slots"]), SlotTable.from_json(other.target["slots"])


def own_part(source: Any, modules: ir.ModuleTable, model: Any, own: SlotTable, other: SlotTable) -> tuple[Any, Any]:
    """``(modules, source)`` of one program: without the modules only the other program has slots for,
    and ``source`` without their keys (listed among the adapter's unused keys, as a compile does)."""
    mine = set(own.by_module())
    elsewhere = {module for module in other.by_module() if module not in mine}
    kept = {path: info for path, info in modules.items() if path not in elsewhere}
    table = ir.ModuleTable(kept, modules.state_shapes, modules.tensors)
    return table, seq2seq.split_keys(source, set(kept), model)


def refreshed(directory: Path, files: list[dict[str, Any]], encoder: Path) -> list[dict[str, Any]]:
    """``files`` (the decoder step's records) with the encoder program's records read again from its
    manifest: that manifest and every file it lists."""
    where = encoder.relative_to(directory).as_posix()
    kept = [f for f in files if not f["path"].startswith(f"{where}/")]
    listed = [f["path"] for f in read_manifest(encoder).target["files"]] + [MANIFEST_FILE]
    return [*kept, *(file_record(encoder / name, directory) for name in listed)]
