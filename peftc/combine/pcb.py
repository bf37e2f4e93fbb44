"""PCB-merging (Parameter Competition Balancing; ``shared/methods.md`` §9.5, ``FORMATS.md`` §5).

For T task vectors flattened to rows ``τ_i`` of one tensor:

1. clip ``|τ_i|`` to its [0.0001, 0.9999] quantiles (by sorted position, as the reference code does);
2. intra-balancing ``exp(T · minmax(|τ_i|)²)`` (importance within the task), inter-balancing
   ``tanh(τ_i ⊙ Σ_j τ_j)`` (agreement with the others), ``β_i`` their product;
3. keep the top ``ratio`` of each ``β_i`` (entries below its ``1 − ratio`` quantile are raised to it) and
   min-max normalise, so dropped entries get weight 0;
4. ``τ = Σ_i w_i τ̂_i β_i / Σ_i β_i`` (``τ̂_i`` the clipped vectors; ``w_i`` the task weights, the
   reference's λ_i).

The reference applies this to the whole model flattened into one vector; peftc applies it per tensor
(streaming, and so one module's scale does not decide another's), and guards the min-max divisions
(a task vector that is constant on a tensor — zero where its adapter does not reach — gets
``minmax = 0`` instead of 0/0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _minmax(x: torch.Tensor) -> torch.Tensor:
    low = x.min(dim=1, keepdim=True).values
    high = x.max(dim=1, keepdim=True).values
    return (x - low) / (high - low).clamp(min=1e-12)


def _order_statistic(x: torch.Tensor, index: int) -> torch.Tensor:
    """Each row's value at sorted position ``index`` (0-based), as a column: a small ``topk`` near
    either end, else ``kthvalue`` — the reference's full sort, without sorting."""
    d = x.shape[1]
    if index < 64:
        return torch.topk(x, index + 1, dim=1, largest=False).values[:, -1:]
    if d - 1 - index < 64:
        return torch.topk(x, d - index, dim=1).values[:, -1:]
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def _clip_rows(x: torch.Tensor, low_ratio: float, high_ratio: float) -> torch.Tensor:
    """Each row clamped to its sorted values at positions ``int(d·low)`` and ``int(d·(1 − high)) − 1``."""
    d = x.shape[1]
    low = _order_statistic(x, int(d * low_ratio))
    high = _order_statistic(x, int(d * (1 - high_ratio)) - 1)
    return torch.clamp(x, low, high)


def merge(
    taus: Sequence[torch.Tensor], weights: Sequence[float], ratio: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The PCB merge of one tensor's task vectors, and each vector as it was kept (``τ̂_i`` where
    ``β_i > 0``, else 0: what the report counts as trimmed)."""
    shape = taus[0].shape
    rows = torch.stack([t.reshape(-1) for t in taus])
    count = rows.shape[0]
    magnitude = _clip_rows(rows.abs(), 0.0001, 0.0001)
    clipped = rows.sign() * magnitude
    intra = torch.exp(count * _minmax(magnitude) ** 2)
    inter = torch.tanh(rows * rows.sum(dim=0))
    balance = _minmax(_clip_rows(intra * inter, 1 - ratio, 0.0))
    weighted = clipped * torch.tensor(list(weights), dtype=rows.dtype)[:, None]
    merged = (weighted * balance).sum(dim=0) / balance.sum(dim=0).clamp(min=1e-12)
    kept = [(clipped[i] * (balance[i] > 0)).reshape(shape) for i in range(count)]
    return merged.reshape(shape), kept
