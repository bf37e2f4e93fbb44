"""Co-permutation of a LLaMA-style base for S²FT adapters (``--co-permute``): the plan.

An unmerged S²FT site gathers the selected input columns (``o_proj``/``down_proj``) or scatters into
the selected output rows (``v_proj``/``up_proj``). Permuting the base once so that every selection is
one contiguous range turns both into slices (``s2ft_slice_linear``). The permutation must not change
what the model computes:

* **attention**: whole heads move (RoPE rotates within a head, so a head's ``head_dim`` rows stay
  together and in order), and under GQA whole KV groups move: a KV head's rows of ``k_proj``/``v_proj``
  with the rows of its query heads in ``q_proj`` and their columns of ``o_proj``. Query heads may be
  reordered inside their group (they all read the same KV head);
* **MLP**: a channel's rows of ``gate_proj``/``up_proj`` move with its column of ``down_proj``.

:func:`plan` finds, per attention block, a KV-group order and a query-head order, and per MLP block a
channel order, under which every S²FT selection on a permuted dimension (q/k/v rows, o columns,
gate/up rows, down columns) is contiguous. A selection that is not whole heads, or selections that no
order makes contiguous together, are refused (compile without ``--co-permute``: the gather path).
Orders are stored as in ``extract.py``: the original head/group/channel at each new position.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from peftc.errors import UnsupportedError
from peftc.sparse.extract import expand

CHANNEL_ROWS = ("gate_proj", "up_proj")
PERMUTED = {
    (".self_attn", "q_proj", 0): "query head",
    (".self_attn", "k_proj", 0): "KV head",
    (".self_attn", "v_proj", 0): "KV head",
    (".self_attn", "o_proj", 1): "query head",
    (".mlp", "gate_proj", 0): "channel",
    (".mlp", "up_proj", 0): "channel",
    (".mlp", "down_proj", 1): "channel",
}
"""(block suffix, module, dim) → the unit a selection of that dimension is made of; other dimensions
(q/k/v columns, o rows, gate/up columns, down rows) read or write the hidden state and keep their order."""
MAX_ITEMS = 7
"""Most distinct selection patterns per block the search arranges (7! orders)."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """One S²FT site's indices: ``module`` (e.g. ``layers.0.self_attn.v_proj``), rows (``dim`` 0) or columns."""

    module: str
    dim: int
    indices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The base's new order (see the module docstring)."""

    heads: tuple[int, int, int]
    """``(query heads, KV heads, head_dim)``."""
    attention: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]
    """Attention block (``layers.0.self_attn``) → (KV group order, query head order)."""
    mlp: Mapping[str, tuple[int, ...]]
    """MLP block (``layers.0.mlp``) → channel order."""

    def orders(self) -> dict[str, tuple[int, torch.Tensor]]:
        """Parameter key → ``(dim, the original row/column at each new position)``, for every tensor the
        plan permutes (biases included; keys the model lacks are simply absent from its state)."""
        hd = self.heads[2]
        out: dict[str, tuple[int, torch.Tensor]] = {}
        for block, (groups, query) in self.attention.items():
            q_rows, kv_rows = expand(list(query), hd), expand(list(groups), hd)
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                out[f"{block}.{name}.weight"] = out[f"{block}.{name}.bias"] = (0, rows)
            out[f"{block}.o_proj.weight"] = (1, q_rows)
        for block, channels in self.mlp.items():
            order = torch.tensor(channels, dtype=torch.int64)
            for name in CHANNEL_ROWS:
                out[f"{block}.{name}.weight"] = out[f"{block}.{name}.bias"] = (0, order)
            out[f"{block}.down_proj.weight"] = (1, order)
        return out

    def order_for(self, module: str, dim: int) -> torch.Tensor | None:
        """The order of ``module``'s rows (``dim`` 0) or columns, or None where the plan keeps them."""
        found = self.orders().get(f"{module}.weight")
        return found[1] if found is not None and found[0] == dim else None

    def to_json(self) -> dict[str, Any]:
        """The manifest's record: per block, the original KV group / query head / channel at each position."""
        return {
            "heads": {"query": self.heads[0], "kv": self.heads[1], "head_dim": self.heads[2]},
            "attention": {b: {"kv_groups": list(g), "query_heads": list(q)} for b, (g, q) in self.attention.items()},
            "mlp": {b: list(c) for b, c in self.mlp.items()},
        }


def new_positions(order: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Where the original rows/columns ``indices`` sit under ``order``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse[indices]


def plan(selections: Sequence[Selection], heads: tuple[int, int, int], shapes: Mapping[str, Sequence[int]]) -> Plan:
    """The order that makes every selection on a permuted dimension contiguous (module docstring).

    ``shapes``: parameter key → shape, to know each block's size.

    Raises:
        UnsupportedError: a selection that is not whole heads, or selections no order makes
            contiguous together (naming the block and the selections).
    """
    n_heads, n_kv, hd = heads
    rep = n_heads // n_kv
    attention: dict[str, list[tuple[str, frozenset[int]]]] = {}
    mlp: dict[str, list[tuple[str, frozenset[int]]]] = {}
    for s in selections:
        block, _, name = s.module.rpartition(".")
        side = "rows" if s.dim == 0 else "columns"
        unit = PERMUTED.get(("." + block.rpartition(".")[2], name, s.dim))
        if unit == "channel":
            mlp.setdefault(block, []).append((f"{name} {side}", frozenset(s.indices)))
        elif unit is not None:
            units = _whole_heads(f"{s.module} s2ft_{side}", s.indices, hd, unit)
            query = {g * rep + r for g in units for r in range(rep)} if unit == "KV head" else set(units)
            attention.setdefault(block, []).append((f"{name} {side}", frozenset(query)))
    planned_attention = {}
    for block, sets in sorted(attention.items()):
        groups = [list(range(g * rep, (g + 1) * rep)) for g in range(n_kv)]
        ordered = _arrange(
            block, groups, sets, f"{n_heads} query heads over {n_kv} KV heads (whole KV groups moving together)"
        )
        planned_attention[block] = (tuple(b[0] // rep for b in ordered), tuple(u for b in ordered for u in b))
    planned_mlp = {}
    for block, sets in sorted(mlp.items()):
        size = shapes[f"{block}.down_proj.weight"][1]
        ordered = _arrange(block, [[c] for c in range(size)], sets, f"{size} channels")
        planned_mlp[block] = tuple(b[0] for b in ordered)
    return Plan(heads, planned_attention, planned_mlp)


def _whole_heads(what: str, indices: tuple[int, ...], hd: int, unit: str) -> list[int]:
    units = sorted({i // hd for i in indices})
    if list(indices) != expand(units, hd).tolist():
        partial = next(u for u in units if sum(i // hd == u for i in indices) != hd)
        count = sum(i // hd == partial for i in indices)
        raise UnsupportedError(
            f"--co-permute: {what} select {count} of the {hd} rows/columns of {unit} {partial}: co-permutation "
            "moves whole heads, so a selection must be whole heads; compile without --co-permute (the gather path)"
        )
    return units


def _arrange(
    block: str, units: list[list[int]], named: list[tuple[str, frozenset[int]]], layout: str
) -> list[list[int]]:
    """``units`` (blocks of units that move together, each reorderable inside) in an order that makes
    every set of ``named`` contiguous: blocks alike (each set covers all or none of them) move as one
    item; blocks a set covers in part are items of their own, tried with the covered units first and
    last. Every order of the items is tried (at most :data:`MAX_ITEMS` items); blocks no set touches
    go last."""
    sets = list(dict.fromkeys(s for _, s in named))

    def cover(block_units: list[int]) -> tuple[int, ...]:
        return tuple(2 if set(block_units) <= s else 1 if s & set(block_units) else 0 for s in sets)

    classes: dict[tuple[int, ...], list[list[int]]] = {}
    partial, rest = [], []
    for b in units:
        key = cover(b)
        if 1 in key:
            partial.append(b)
        elif any(key):
            classes.setdefault(key, []).append(b)
        else:
            rest.append(b)
    items: list[Any] = [*classes.values(), *([b] for b in partial)]
    if len(items) <= MAX_ITEMS:
        for order in itertools.permutations(range(len(items))):
            for flips in itertools.product((False, True), repeat=len(partial)):
                sequence = _sequence([items[i] for i in order], partial, flips, sets)
                if _contiguous(sequence, sets):
                    return [*sequence, *rest]
    described = "; ".join(f"{name}: {sorted(s)}" for name, s in named)
    raise UnsupportedError(
        f"--co-permute: {block}: no order of its {layout} makes these S²FT selections contiguous together "
        f"({described}); compile without --co-permute (the gather path)"
    )


def _sequence(items: list[list[list[int]]], partial: list[list[int]], flips: tuple[bool, ...], sets) -> list[list[int]]:
    """The blocks of ``items`` in order, each partial block's covered units first (or last, flipped)."""
    out = []
    for item in items:
        for b in item:
            if b in partial:
                flip = flips[partial.index(b)]
                b = sorted(b, key=lambda u: tuple(u in s for s in sets), reverse=not flip)
            out.append(b)
    return out


def _contiguous(blocks: list[list[int]], sets: list[frozenset[int]]) -> bool:
    position = {u: i for i, u in enumerate(u for b in blocks for u in b)}
    for s in sets:
        where = [position[u] for u in s]
        if max(where) - min(where) + 1 != len(s):
            return False
    return True
