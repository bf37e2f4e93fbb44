"""S²FT sites in a swappable artifact: fixed-capacity index + block slots (``PEFTC_S2FT`` adapters).

An S²FT site updates ``k`` whole output rows (``v_proj``/``up_proj``) or input columns
(``o_proj``/``down_proj``) of one linear with a dense block. Its slot holds ``K ≥ k`` indices and a
block of ``K`` rows/columns: the adapter's ``k`` first, then padding, index 0 with an all-zero block
row/column, which adds exact zeros (``peftc/swap/ops.py``). ``K`` is per module: by default the
largest ``k`` of the given adapters there, or ``--slot-capacity``.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc.errors import InputError
from peftc.methods import s2ft
from peftc.methods.base import Adapter, AdapterTensor, Site
from peftc.swap.table import INDEX_PART, Slot, SlotTable


def is_s2ft(site: Site) -> bool:
    """Whether ``site`` is an S²FT site (an unmerged ``s2ft_linear`` call)."""
    return site.op == s2ft.S2FT_LINEAR.name


def _parts(site: Site) -> tuple[str, AdapterTensor, AdapterTensor]:
    kind = "s2ft_rows" if site.scalars["dim"] == s2ft.ROWS else "s2ft_columns"
    return kind, site.tensors["s2ft_indices"], site.tensors["s2ft_block"]


def slot_of(site: Site) -> tuple[Slot, int, torch.dtype]:
    """The slot (capacity 0: not chosen yet) an S²FT site needs, its ``k`` and its block's dtype."""
    kind, indices, block = _parts(site)
    d_out, d_in = site.info["weight"]
    return Slot(site.module, kind, d_in, d_out), indices.tensor.shape[0], block.tensor.dtype


def with_capacity(slot: Slot, k: int, owner: str, capacity: int | None) -> Slot:
    """``slot`` with its capacity: ``capacity`` (``--slot-capacity``, at most the rows/columns there
    are) or, for None, ``k``, the largest of the given adapters (``owner`` has it).

    Raises:
        InputError: ``capacity`` below ``k``.
    """
    what = "rows" if slot.kind == "s2ft_rows" else "columns"
    if capacity is not None and capacity < k:
        raise InputError(
            f"--slot-capacity {capacity} is below the {k} {what} adapter {owner!r} updates in {slot.module!r}"
        )
    size = slot.d_out if slot.kind == "s2ft_rows" else slot.d_in
    return dataclasses.replace(slot, capacity=min(size, k if capacity is None else capacity))


def check_fits(table: SlotTable, adapter: Adapter, site: Site, slot: Slot | None) -> None:
    """Raise, naming the module and capacity, if the S²FT ``site`` does not fit ``slot``."""
    kind, indices, block = _parts(site)
    where = adapter.source.describe(indices.key)
    if slot is None or slot.kind != kind:
        held = "no slot" if slot is None else f"a {slot.kind} slot"
        raise InputError(
            f"{where}: module {site.module!r} has {held} in this artifact, but adapter {adapter.name!r} updates its "
            f"{kind.removeprefix('s2ft_')}; recompile with this adapter among the --adapter arguments"
        )
    k = indices.tensor.shape[0]
    if k > slot.capacity:
        raise InputError(
            f"{where}: {k} {kind.removeprefix('s2ft_')} of {site.module!r}, above its slot capacity {slot.capacity} "
            "(recompile with a larger --slot-capacity)"
        )
    expected = (k, slot.d_in) if kind == "s2ft_rows" else (slot.d_out, k)
    if tuple(block.tensor.shape) != expected:
        raise InputError(
            f"{adapter.source.describe(block.key)}: shape {list(block.tensor.shape)}, slot needs {list(expected)}"
        )
    dtype = str(block.tensor.dtype).removeprefix("torch.")
    if dtype != table.dtype:
        raise InputError(
            f"{adapter.source.describe(block.key)}: dtype {dtype}, but the artifact's slots are {table.dtype}"
        )


def fill(values: dict[str, torch.Tensor], site: Site) -> None:
    """Put the S²FT ``site``'s indices and block into the first ``k`` entries of its (zero) slot values."""
    kind, indices, block = _parts(site)
    k = indices.tensor.shape[0]
    values[f"{site.module}:{INDEX_PART}"][:k] = indices.tensor.to(torch.int64)
    part = values[f"{site.module}:S"]
    if kind == "s2ft_rows":
        part[:k] = block.tensor.to(part.dtype)
    else:
        part[:, :k] = block.tensor.to(part.dtype)
