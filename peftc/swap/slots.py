"""Slots for the LoRA, S²FT and sparse-ΔW sites of a swappable compile's adapters, and packing an adapter
into them.

A swappable compile turns the LoRA sites of the adapters it is given into *slots* (``ops.py``):
fixed-shape tensors of rank ``R`` that hold any LoRA adapter of rank ``≤ R`` on a subset of those
modules. :func:`plan` makes the :class:`~peftc.swap.table.SlotTable` for the given adapters and
:func:`slot_adapter` the zero slots ``insert-sites`` puts on the base program.

:func:`pack` turns a parsed adapter into slot values: ``A`` zero-padded to ``R`` rows and ``s·B``
zero-padded to ``R`` columns, zeros for the slots it does not use; S²FT and sparse-ΔW sites fill
index slots (``s2ft_slots.py``, ``sparse_slots.py``). :func:`check_fits` refuses, with
the module and shapes named, an adapter that does not fit: another method, a module without a slot,
a rank above ``R``, full-tensor replacements (which no slot can hold).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.methods import s2ft
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, Site
from peftc.swap import s2ft_slots, sparse_slots
from peftc.swap.ops import (
    LORA_EMBEDDING_SLOT,
    LORA_EMBEDDING_SLOT_BANK,
    LORA_SLOT,
    LORA_SLOT_BANK,
    S2FT_SLOT,
    S2FT_SLOT_BANK,
    SPARSE_SLOT,
    SPARSE_SLOT_BANK,
)
from peftc.swap.table import INDEX_PART, LORA_KINDS, SLOT_ADAPTER, SPARSE_KIND, Slot, SlotTable


def _lora_parts(adapter: Adapter, site: Site) -> tuple[str, AdapterTensor, AdapterTensor, float]:
    """``(kind, A, B, scale)`` of a LoRA site a slot can hold, else an UnsupportedError naming it."""
    if site.op == "lora_linear" and site.tensors.get("lora_B_bias") is None:
        return "linear", site.tensors["lora_A"], site.tensors["lora_B"], float(site.scalars["scale"])
    if site.op == "lora_weight" and site.scalars.get("layout") == "embedding":
        return "embedding", site.tensors["lora_A"], site.tensors["lora_B"], float(site.scalars["scale"])
    what = "lora_bias" if site.op == "lora_linear" else f"{adapter.method} ({site.op}"
    what += "" if site.op == "lora_linear" else f" on a {site.info.get('module_type', '?')})"
    raise UnsupportedError(
        f"adapter {adapter.name!r}: {what} on {site.module!r} cannot be swapped; swappable artifacts hold LoRA on "
        "nn.Linear, GPT-2 Conv1D and nn.Embedding, S²FT, and sparse ΔW on nn.Linear (compile without "
        "--swappable to merge or keep it unmerged)"
    )


def _slot_of(adapter: Adapter, site: Site) -> tuple[Slot, int, torch.dtype]:
    """The slot a site needs (an index slot's capacity not chosen yet), its rank or ``k``, its dtype."""
    if s2ft_slots.is_s2ft(site):
        return s2ft_slots.slot_of(site)
    if sparse_slots.is_sparse(site):
        return sparse_slots.slot_of(adapter, site)
    kind, a, b, _ = _lora_parts(adapter, site)
    slot = Slot(
        site.module, kind, a.tensor.shape[1], b.tensor.shape[0], bool(site.scalars.get("fan_in_fan_out", False))
    )
    return slot, a.tensor.shape[0], a.tensor.dtype


def plan(adapters: Sequence[Adapter], max_rank: int | None, bank: int = 0, capacity: int | None = None) -> SlotTable:
    """The slot table for the adapters a swappable compile is given (the union of their sites).

    Raises:
        UnsupportedError: an adapter no slot can hold (see :func:`check_fits`).
        InputError: ``max_rank`` below an adapter's rank, ``capacity`` below an S²FT adapter's rows or
            columns (a sparse one's entries), adapters of different dtypes, or two adapters adapting one
            module differently.
    """
    found: dict[str, Slot] = {}
    ranks, sizes, dtypes = [], {}, set()
    for adapter in adapters:
        _check_whole(adapter)
        for site in adapter.sites:
            slot, size, dtype = _slot_of(adapter, site)
            if found.setdefault(site.module, slot) != slot:
                raise InputError(_disagree(found[site.module], slot, adapter))
            if slot.kind in LORA_KINDS:
                ranks.append(size)
            elif size > sizes.get(site.module, (0, ""))[0]:
                sizes[site.module] = (size, adapter.name)
            dtypes.add(str(dtype).removeprefix("torch."))
    if not found:
        raise InputError("no LoRA, S²FT or sparse-ΔW site to make swappable in the given adapters")
    if len(dtypes) > 1:
        raise InputError(f"adapters of different dtypes {sorted(dtypes)}: slots have one dtype; convert them first")
    for module, (k, owner) in sizes.items():
        kind = sparse_slots if found[module].kind == SPARSE_KIND else s2ft_slots
        found[module] = kind.with_capacity(found[module], k, owner, capacity)
    rank = _rank(ranks, [s for s in found.values() if s.kind in LORA_KINDS], max_rank)
    return SlotTable(rank, dtypes.pop(), tuple(found[m] for m in sorted(found)), bank)


_METHODS = {
    "linear": "LoRA",
    "embedding": "LoRA",
    "s2ft_rows": "S²FT",
    "s2ft_columns": "S²FT",
    SPARSE_KIND: "a sparse ΔW",
}


def _disagree(held: Slot, wanted: Slot, adapter: Adapter) -> str:
    if _METHODS[held.kind] != _METHODS[wanted.kind]:
        return (
            f"adapter {adapter.name!r}: module {wanted.module!r} is adapted by {_METHODS[held.kind]} in one adapter "
            f"and by {_METHODS[wanted.kind]} in another; a swappable artifact holds one kind of slot per module"
        )
    return f"adapters disagree on the shape of module {wanted.module!r}: {held} vs {wanted}"


def _rank(ranks: list[int], lora: list[Slot], max_rank: int | None) -> int:
    """The LoRA slots' rank: ``max_rank`` or the largest given rank (0 with no LoRA slot)."""
    if not ranks:
        if max_rank is not None:
            raise InputError("--max-rank sets the rank of LoRA slots, but the given adapters have no LoRA site")
        return 0
    rank = max(ranks) if max_rank is None else int(max_rank)
    if rank < max(ranks):
        raise InputError(f"--max-rank {rank} is below the rank {max(ranks)} of a given adapter")
    # A rank above min(d_in, d_out) cannot change what a slot computes; beyond that, memory only.
    useful = max(max(ranks), *(min(slot.d_in, slot.d_out) for slot in lora))
    if rank > useful:
        raise InputError(
            f"--max-rank {rank} is above {useful}, the largest rank that changes what a slot computes "
            "(min(d_in, d_out) of the widest slotted layer, or the largest given adapter rank)"
        )
    return rank


def _check_whole(adapter: Adapter) -> None:
    if adapter.replacements:
        what = adapter.replacements[0]
        raise UnsupportedError(
            f"adapter {adapter.name!r} replaces full tensors ({what.param}: {what.reason}), which no slot can hold; "
            "compile it without --swappable"
        )


def check_fits(table: SlotTable, adapter: Adapter) -> None:
    """Raise, naming module and shapes (rank or capacity), if ``adapter`` does not fit ``table``'s slots."""
    _check_whole(adapter)
    slots = table.by_module()
    for site in adapter.sites:
        if s2ft_slots.is_s2ft(site):
            s2ft_slots.check_fits(table, adapter, site, slots.get(site.module))
            continue
        if sparse_slots.is_sparse(site):
            sparse_slots.check_fits(table, adapter, site, slots.get(site.module))
            continue
        kind, a, b, _ = _lora_parts(adapter, site)
        slot = slots.get(site.module)
        if slot is None:
            raise InputError(
                f"adapter {adapter.name!r}: module {site.module!r} has no slot in this artifact; its slots are on "
                f"{len(slots)} modules ({', '.join(sorted(slots)[:4])}{', …' if len(slots) > 4 else ''})"
            )
        rank = a.tensor.shape[0]
        if rank > table.rank:
            raise InputError(
                f"{adapter.source.describe(a.key)}: rank {rank} is above the artifact's maximum rank {table.rank} "
                "(recompile with a larger --max-rank)"
            )
        if (kind, a.tensor.shape[1], b.tensor.shape[0]) != (slot.kind, slot.d_in, slot.d_out):
            raise InputError(
                f"{adapter.source.describe(a.key)}: {kind} factors [{rank}, {a.tensor.shape[1]}] / "
                f"[{b.tensor.shape[0]}, {rank}] do not fit the slot of {site.module!r} ({slot.kind}, d_in={slot.d_in}, "
                f"d_out={slot.d_out})"
            )
        dtype = str(a.tensor.dtype).removeprefix("torch.")
        if dtype != table.dtype:
            raise InputError(
                f"{adapter.source.describe(a.key)}: dtype {dtype}, but the artifact's slots are {table.dtype}"
            )


def pack(table: SlotTable, adapter: Adapter | None) -> dict[str, torch.Tensor]:
    """Slot values for ``adapter`` (zeros everywhere for None: the base model), keyed ``module:part``.

    LoRA: ``B`` holds ``s·B`` (computed in fp32, cast to the slot dtype); unused rows/columns are zero.
    S²FT / sparse: the indices and block / values in the first ``k`` entries; padding is index 0 with zeros.
    """
    dtypes = {INDEX_PART: torch.int64}
    values = {}
    for slot in table.slots:
        for part, shape in slot.shapes(table.rank).items():
            values[f"{slot.module}:{part}"] = torch.zeros(shape, dtype=dtypes.get(part, getattr(torch, table.dtype)))
    if adapter is None:
        return values
    check_fits(table, adapter)
    dtype = getattr(torch, table.dtype)
    for site in adapter.sites:
        if s2ft_slots.is_s2ft(site):
            s2ft_slots.fill(values, site)
            continue
        if sparse_slots.is_sparse(site):
            sparse_slots.fill(values, adapter, site)
            continue
        kind, a, b, scale = _lora_parts(adapter, site)
        rank = a.tensor.shape[0]
        if kind == "embedding":  # an embedding slot holds Aᵀ
            values[f"{site.module}:A"][:, :rank] = a.tensor.T.to(dtype)
        else:
            values[f"{site.module}:A"][:rank] = a.tensor.to(dtype)
        values[f"{site.module}:B"][:, :rank] = (b.tensor.to(torch.float32) * scale).to(dtype)
    return values


_OPS = {
    "linear": (LORA_SLOT, LORA_SLOT_BANK),
    "embedding": (LORA_EMBEDDING_SLOT, LORA_EMBEDDING_SLOT_BANK),
    "s2ft_rows": (S2FT_SLOT, S2FT_SLOT_BANK),
    "s2ft_columns": (S2FT_SLOT, S2FT_SLOT_BANK),
    SPARSE_KIND: (SPARSE_SLOT, SPARSE_SLOT_BANK),
}


def slot_adapter(table: SlotTable) -> Adapter:
    """A stand-in adapter whose sites are the zero slots, for ``insert-sites``."""
    zeros = pack(table, None)
    sites = []
    for slot in table.slots:
        prefix = "bank_" if table.bank else "slot_"
        tensors = {}
        for part in slot.parts():
            value = zeros[f"{slot.module}:{part}"]
            value = value[None].repeat(table.bank, *([1] * value.dim())) if table.bank else value
            tensors[prefix + part] = AdapterTensor(f"slot {part} of {slot.module}", value, index=part == INDEX_PART)
        op = _OPS[slot.kind][1 if table.bank else 0]
        if slot.kind == "embedding":
            scalars = {}
        elif slot.kind in LORA_KINDS:
            scalars = {"fan_in_fan_out": slot.fan_in_fan_out}
        elif slot.kind == SPARSE_KIND:
            scalars = {}
        else:
            scalars = {"dim": s2ft.ROWS if slot.kind == "s2ft_rows" else s2ft.COLUMNS}
        sites.append(Site(slot.module, op.name, tensors, scalars, {"slot": True}))
    where = Path(SLOT_ADAPTER)
    source = AdapterSource(SLOT_ADAPTER, where, where, where, {}, {}, {})
    return Adapter(name=SLOT_ADAPTER, method="slots", source=source, sites=tuple(sites))
