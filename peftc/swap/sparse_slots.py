"""Sparse-ΔW sites in a swappable artifact: fixed-capacity position + value slots (``PEFTC_SPARSE``,
PEFT's SHiRA and ComPEFT's ternary ΔW on ``nn.Linear`` weights).

A ComPEFT site (``c·signs``, signs in {−1, 0, 1}) is held as its non-zero signs' positions with values
``±c`` (fp32): the same update, entry for entry.

Such a site adds values ``v_k`` at row-major positions ``p_k`` of a linear's weight ``[d_out, d_in]``.
Its slot holds ``K ≥ k`` positions (int64) and values: the adapter's first, then padding, position 0
with value 0, which adds exact zeros. The slot op never forms ``ΔW``: with ``r = p // d_in`` and
``c = p % d_in`` it adds ``x[..., c] · v`` into ``y[..., r]`` (``peftc/swap/ops.py``). ``K`` is per
module: the most entries a given adapter has there, or ``--slot-capacity``.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.methods import compeft, shira, sparse
from peftc.methods.base import Adapter, AdapterTensor, Site
from peftc.swap.table import INDEX_PART, Slot, SlotTable

_ROLES = {
    sparse.SPARSE_DELTA.name: ("sparse_indices", "sparse_values"),
    shira.SHIRA_WEIGHT.name: ("shira_indices", "shira_weight"),
}


def is_sparse(site: Site) -> bool:
    """Whether ``site`` adds a sparse ``ΔW`` (PEFTC_SPARSE, SHiRA or ComPEFT)."""
    return site.op in _ROLES or site.op == compeft.TERNARY_DELTA.name


def _entries(site: Site) -> tuple[AdapterTensor, AdapterTensor]:
    """The row-major positions and values of a sparse site (a ComPEFT site's: its non-zero signs, ``±c``)."""
    if site.op != compeft.TERNARY_DELTA.name:
        positions, values = (site.tensors[role] for role in _ROLES[site.op])
        return positions, values
    signs = site.tensors["signs"]
    flat = signs.tensor.flatten()
    where = flat.nonzero().flatten()
    scaled = flat[where].to(torch.float32) * site.scalars["scale"]
    return AdapterTensor(signs.key, where, index=True), AdapterTensor(signs.key, scaled)


def _parts(adapter: Adapter, site: Site) -> tuple[AdapterTensor, AdapterTensor]:
    """The positions and values of a sparse site a slot can hold, else an UnsupportedError naming it."""
    positions, values = _entries(site)
    if site.param != "weight" or site.info.get("module_type") != "Linear":
        raise UnsupportedError(
            f"adapter {adapter.name!r}: the sparse update of {site.module}.{site.param} cannot be swapped; sparse "
            "slots hold updates of nn.Linear weights (compile without --swappable to merge it)"
        )
    if site.scalars.get("keep_base_sparsity"):
        raise UnsupportedError(
            f"adapter {adapter.name!r}: keep_base_sparsity masks the update by the base weights, which a slot "
            "does not read; compile it without --swappable (merged)"
        )
    return positions, values


def slot_of(adapter: Adapter, site: Site) -> tuple[Slot, int, torch.dtype]:
    """The slot (capacity 0: not chosen yet) a sparse site needs, its entry count and its values' dtype."""
    positions, values = _parts(adapter, site)
    d_out, d_in = site.info["weight"]
    return Slot(site.module, "sparse", d_in, d_out), positions.tensor.shape[0], values.tensor.dtype


def with_capacity(slot: Slot, k: int, owner: str, capacity: int | None) -> Slot:
    """``slot`` with its capacity: ``capacity`` (at most the weight's size) or, for None, ``k``, the most
    entries a given adapter (``owner``) has there.

    Raises:
        InputError: ``capacity`` below ``k``.
    """
    if capacity is not None and capacity < k:
        raise InputError(
            f"--slot-capacity {capacity} is below the {k} entries adapter {owner!r} updates in {slot.module!r}"
        )
    return dataclasses.replace(slot, capacity=min(slot.d_in * slot.d_out, k if capacity is None else capacity))


def check_fits(table: SlotTable, adapter: Adapter, site: Site, slot: Slot | None) -> None:
    """Raise, naming the module and capacity, if the sparse ``site`` does not fit ``slot``."""
    positions, values = _parts(adapter, site)
    where = adapter.source.describe(positions.key)
    if slot is None or slot.kind != "sparse":
        held = "no slot" if slot is None else f"a {slot.kind} slot"
        raise InputError(
            f"{where}: module {site.module!r} has {held} in this artifact, but adapter {adapter.name!r} adds a sparse "
            "update to it; recompile with this adapter among the --adapter arguments"
        )
    k = positions.tensor.shape[0]
    if k > slot.capacity:
        raise InputError(
            f"{where}: {k} entries in {site.module!r}, above its slot capacity {slot.capacity} "
            "(recompile with a larger --slot-capacity)"
        )
    if list(site.info["weight"]) != [slot.d_out, slot.d_in]:
        raise InputError(f"{where}: weight {site.info['weight']}, slot is [{slot.d_out}, {slot.d_in}]")
    dtype = str(values.tensor.dtype).removeprefix("torch.")
    if dtype != table.dtype:
        raise InputError(
            f"{adapter.source.describe(values.key)}: dtype {dtype}, but the artifact's slots are {table.dtype}"
        )


def fill(values: dict[str, torch.Tensor], adapter: Adapter, site: Site) -> None:
    """Put the sparse ``site``'s positions and values into the first ``k`` entries of its (zero) slot values."""
    positions, entries = _parts(adapter, site)
    k = positions.tensor.shape[0]
    values[f"{site.module}:{INDEX_PART}"][:k] = positions.tensor.to(torch.int64)
    values[f"{site.module}:V"][:k] = entries.tensor.to(values[f"{site.module}:V"].dtype)
