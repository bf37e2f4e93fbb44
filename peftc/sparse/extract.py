"""Recover an S²FT update from a base and a fine-tuned checkpoint of it (``peftc extract``).

The official S²FT code saves a dense checkpoint: heads (whole KV groups) and FFN channels
co-permuted so the selected ones are contiguous, then a few sub-blocks trained — rows of
``v_proj``/``up_proj``, columns of ``o_proj``/``down_proj`` — and no indices. Recovery:

1. **Permutation.** ``q_proj``/``k_proj`` and ``gate_proj`` are only permuted, never trained, so
   each of their fine-tuned blocks (a KV group's q rows and k rows; a channel's gate row) equals one
   base block *exactly*. The match gives the group order π (q and k must agree) and the channel
   order σ. A block that matches none is refused with how far the closest base block is.
2. **Difference.** ``v`` rows and ``o`` columns are compared with the base under π (whole heads),
   ``up`` rows and ``down`` columns under σ. The changed rows/columns are the update; every other
   tensor of the checkpoint must be unchanged, but for q/k/v biases (Qwen2): the base's, moved with
   their rows by π.
3. **Structure.** The update must be whole heads (all ``head_dim`` rows of a KV head in ``v``, all
   columns of a query head in ``o``), fill the rows/columns it changes (at least ``min_fill`` of their
   entries), change at most ``max_density`` of each matrix's rows/columns, and no changed row/column
   may be a base row/column moved elsewhere (that is a permutation that disagrees with q/k or gate:
   not function-preserving). Otherwise it is refused with the measured numbers.
4. **Check.** The base plus the update, put in the checkpoint's order, reproduces the checkpoint
   (within fp32 rounding): the update is written in the base's own order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.sparse import MAX_DENSITY, MIN_FILL

ATTENTION = re.compile(r"^(.*)\.self_attn\.q_proj\.weight$")
MLP = re.compile(r"^(.*)\.mlp\.gate_proj\.weight$")


@dataclasses.dataclass(frozen=True)
class Limits:
    """When a difference still counts as an S²FT update."""

    max_density: float = MAX_DENSITY
    """Largest fraction of a matrix's rows (v, up) or columns (o, down) the update may change."""
    min_fill: float = MIN_FILL
    """Smallest fraction of non-zero entries in each changed row/column (dense sub-blocks)."""


@dataclasses.dataclass(frozen=True)
class Update:
    """One module's update in the base's order: ``ΔW[indices, :] = block`` (rows) or ``ΔW[:, indices]``."""

    module: str
    side: str  # "rows" or "columns"
    indices: torch.Tensor
    block: torch.Tensor
    density: float
    fill: float


@dataclasses.dataclass(frozen=True)
class Extracted:
    """The updates and what was found on the way (for ``extract.json``)."""

    updates: list[Update]
    groups: dict[str, list[int]]
    """Attention module → the base KV group at each position of the checkpoint."""
    channels: dict[str, list[int]]
    """MLP module → the base channel at each position of the checkpoint."""
    reconstruction_error: float


def heads(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(query heads, KV heads, head_dim)`` from a Hugging Face config.

    Raises:
        InputError: a config without ``num_attention_heads`` / ``hidden_size``.
    """
    try:
        count = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // count)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"config.json: needs num_attention_heads and hidden_size ({e})") from e
    return count, int(config.get("num_key_value_heads") or count), head_dim


def extract(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], config: Mapping[str, Any], limits: Limits
) -> Extracted:
    """The S²FT update that turns ``base`` into ``tuned`` (see the module docstring).

    Raises:
        InputError: checkpoints of different models, or a difference that is not an S²FT update
            (naming the tensor and the measured numbers).
        UnsupportedError: no LLaMA-style attention or MLP to recover.
    """
    _same_keys(base, tuned)
    n_heads, n_kv, head_dim = heads(config)
    attention = sorted(m.group(1) for k in base if (m := ATTENTION.match(k)))
    mlp = sorted(m.group(1) for k in base if (m := MLP.match(k)))
    if not attention and not mlp:
        raise UnsupportedError("no <layer>.self_attn.q_proj or <layer>.mlp.gate_proj weights: not a LLaMA-style model")
    rep = n_heads // n_kv
    updates, groups, channels, explained = [], {}, {}, set()
    for prefix in attention:
        p = f"{prefix}.self_attn."
        order = _matched(base, tuned, p + "q_proj.weight", n_kv)
        k_order = _matched(base, tuned, p + "k_proj.weight", n_kv)
        if order != k_order:
            raise InputError(
                f"{p}q_proj/k_proj: q rows follow KV groups {order}, k rows {k_order}: a permutation that does "
                "not keep each query head with its KV head is not function-preserving"
            )
        groups[prefix + ".self_attn"] = order
        explained |= _permuted_biases(base, tuned, p, order, rep * head_dim, head_dim)
        updates += _updates(base, tuned, p + "v_proj.weight", 0, order, head_dim, limits, "KV head")
        updates += _updates(base, tuned, p + "o_proj.weight", 1, order, rep * head_dim, limits, "query head", head_dim)
        explained |= {p + f"{m}_proj.weight" for m in "qkvo"}
    for prefix in mlp:
        p = f"{prefix}.mlp."
        order = _matched(base, tuned, p + "gate_proj.weight", base[p + "gate_proj.weight"].shape[0])
        channels[prefix + ".mlp"] = order
        updates += _updates(base, tuned, p + "up_proj.weight", 0, order, 1, limits, "channel")
        updates += _updates(base, tuned, p + "down_proj.weight", 1, order, 1, limits, "channel")
        explained |= {p + f"{m}_proj.weight" for m in ("gate", "up", "down")}
    for key in sorted(set(base) - explained):
        if not torch.equal(base[key], tuned[key]):
            raise InputError(
                f"{key}: changed (max |Δ| {_max_diff(base[key], tuned[key]):.3g}); S²FT changes only v/o/up/down"
            )
    error = _reconstruction_error(base, tuned, updates, groups, channels, rep * head_dim, head_dim)
    return Extracted(updates, groups, channels, error)


def _permuted_biases(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], p: str, order: list[int], q: int, kv: int
) -> set[str]:
    """The q/k/v biases of attention ``p`` (Qwen2 has them), checked to be the base's moved with their rows by
    the KV-group ``order`` (S²FT permutes them with the weights and trains none); their keys.

    Raises:
        InputError: a bias that is not the base's in that order (how far off it is).
    """
    keys = set()
    for name, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        key = f"{p}{name}.bias"
        if key not in base:
            continue
        moved = base[key].index_select(0, expand(order, width))
        if not torch.equal(moved, tuned[key]):
            raise InputError(
                f"{key}: differs from the base's bias in the q/k row order (max |Δ| {_max_diff(moved, tuned[key]):.3g}); "
                "S²FT moves q/k/v biases with their rows and trains none"
            )
        keys.add(key)
    return keys


def _same_keys(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> None:
    for key in sorted(set(base) ^ set(tuned)):
        where = "the fine-tuned checkpoint" if key in tuned else "the base"
        raise InputError(f"{key}: only in {where}; the checkpoints are of different models")
    for key in sorted(base):
        if base[key].shape != tuned[key].shape:
            raise InputError(
                f"{key}: shape {list(tuned[key].shape)} in the fine-tuned checkpoint, {list(base[key].shape)} in the base"
            )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.is_floating_point() else float("nan")


def _matched(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], key: str, blocks: int) -> list[int]:
    """The base block (``blocks`` equal groups of rows) at each position of the fine-tuned matrix, by
    exact equality; refused when one matches none (with the closest relative difference) or the base
    has two equal blocks (the order is ambiguous)."""
    ours, theirs = base[key].reshape(blocks, -1), tuned[key].reshape(blocks, -1)
    where = {ours[i].numpy().tobytes(): i for i in range(blocks)}
    if len(where) < blocks:
        raise InputError(f"{key}: the base has equal row blocks, so the permutation is ambiguous")
    order = []
    for j in range(blocks):
        i = where.get(theirs[j].numpy().tobytes())
        if i is None:
            gaps = (ours.double() - theirs[j].double()).abs().amax(dim=1) / ours.double().abs().max()
            unmatched = sum(theirs[b].numpy().tobytes() not in where for b in range(blocks))
            raise InputError(
                f"{key}: {unmatched} of {blocks} row blocks of the fine-tuned matrix equal no base block (block {j}: "
                f"closest base block {int(gaps.argmin())} differs by {float(gaps.min()):.3g} relative); S²FT only "
                "permutes q_proj, k_proj and gate_proj, so this is not an S²FT checkpoint of this base"
            )
        order.append(i)
    if len(set(order)) < blocks:
        raise InputError(f"{key}: the fine-tuned matrix repeats base row blocks; not a permutation")
    return order


def expand(order: list[int], width: int) -> torch.Tensor:
    """A block order → the row (or column) order of a matrix with ``width`` rows per block."""
    groups = torch.tensor(order, dtype=torch.int64)
    return (groups[:, None] * width + torch.arange(width)).flatten()


def _updates(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    key: str,
    dim: int,
    order: list[int],
    width: int,
    limits: Limits,
    unit: str,
    unit_width: int | None = None,
) -> list[Update]:
    """The changed rows (``dim`` 0) or columns (``dim`` 1) of ``key`` under ``order``, checked (module docstring)."""
    positions = expand(order, width)
    ours = base[key].to(torch.float32)
    theirs = tuned[key].to(torch.float32)
    delta = theirs - ours.index_select(dim, positions)
    changed_entries = delta.ne(0)
    changed = changed_entries.any(dim=1 - dim)
    side = "rows" if dim == 0 else "columns"
    count, total = int(changed.sum()), changed.numel()
    if count == 0:
        return []
    density = count / total
    fills = changed_entries.float().mean(dim=1 - dim)
    sparse_line = int(torch.where(changed, fills, 2.0).argmin())
    fill = float(fills[sparse_line])
    what = f"{key}: the difference from the base changes {count} of {total} {side} (density {density:.3g}"
    moved = _moved(ours, theirs, dim, changed)
    if moved is not None:
        raise InputError(
            f"{what}): {side[:-1]} {moved} equals another base {side[:-1]} exactly, so this matrix was permuted "
            "differently from q/k (gate): the permutation is not consistent, not function-preserving"
        )
    if density > limits.max_density:
        raise InputError(
            f"{what}, limit {limits.max_density}): not a structured-sparse S²FT update; is it a full fine-tune?"
        )
    if fill < limits.min_fill:
        raise InputError(
            f"{what}), {side[:-1]} {sparse_line} in only {fill:.3g} of its entries (limit {limits.min_fill}): "
            "unstructured sparsity, not S²FT's dense sub-blocks"
        )
    step = unit_width or width
    per_unit = changed.reshape(-1, step).sum(dim=1)
    partial = ((per_unit > 0) & (per_unit < step)).nonzero()
    if partial.numel():
        u = int(partial[0, 0])
        raise InputError(
            f"{what}): {unit} {u} has {int(per_unit[u])} of {step} {side} changed; S²FT trains whole {unit}s"
        )
    selected = changed.nonzero()[:, 0]
    original = positions[selected]
    sort = original.argsort()
    block = delta.index_select(dim, selected[sort])
    return [Update(key.removesuffix(".weight"), side, original[sort], block.contiguous(), density, fill)]


def _moved(ours: torch.Tensor, theirs: torch.Tensor, dim: int, changed: torch.Tensor) -> int | None:
    """A changed row/column of the fine-tuned matrix that is some base row/column unchanged, or None."""
    a, b = (ours, theirs) if dim == 0 else (ours.T, theirs.T)
    known = {a[i].numpy().tobytes() for i in range(a.shape[0])}
    for j in changed.nonzero()[:, 0].tolist():
        if b[j].contiguous().numpy().tobytes() in known:
            return j
    return None


def _reconstruction_error(base, tuned, updates, groups, channels, q_width: int, head_dim: int) -> float:
    """Largest |base + update (in the checkpoint's order) − checkpoint| relative to the checkpoint's scale."""
    worst = 0.0
    orders = {**{k: (v, None) for k, v in channels.items()}, **{k: (v, True) for k, v in groups.items()}}
    for update in updates:
        owner, _, name = update.module.rpartition(".")
        order, attention = orders[owner]
        width = (head_dim if name == "v_proj" else q_width) if attention else 1
        dim = 0 if update.side == "rows" else 1
        key = update.module + ".weight"
        rebuilt = base[key].to(torch.float32).index_add(dim, update.indices, update.block)
        rebuilt = rebuilt.index_select(dim, expand(order, width))
        scale = max(float(tuned[key].abs().max()), 1e-30)
        worst = max(worst, _max_diff(rebuilt, tuned[key].to(torch.float32)) / scale)
    return worst
