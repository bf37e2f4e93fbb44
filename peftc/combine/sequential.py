"""Combinations that need the whole model's norms: LiNeS and OPCM (``shared/methods.md`` §9.6–9.7).

**LiNeS** scales the task-arithmetic sum ``τ = Σ w_i τ_i`` of block ``l`` (the first all-digit
component of the tensor's name; ``L`` blocks in the base) by ``λ(l) = α + β·l/(L−1)``; tensors outside
the blocks by ``α``. Defaults follow the reference's multi-task rule: ``α = (‖Σ τ_i‖₁ / ‖τ‖₁) / T``
(``1/T`` at unit weights) and ``β = 1 − α``, so the last block keeps the full sum and the shallow ones
stay near the base. With one block, ``λ = α + β``.

**OPCM** merges the adapters one at a time in the given order. With ``τ_m`` the merged update and
``λ`` its scale (``τ_m = τ_{o_0}``, ``λ = 1`` first), each next task vector ``τ`` is, for the weight of
a linear module, projected off ``τ_m``'s principal subspace: ``τ_m = U S Vᵀ``, ``r`` the
first index where ``cumsum(S)/ΣS > α``, ``P = Uᵀ τ V`` with its diagonal and top-left ``r×r`` block
zeroed, ``τ̃ = U P Vᵀ`` (other tensors: ``τ̃ = τ``; where ``τ_m`` is zero there is no subspace and
``τ̃ = τ``). Then ``ν = λ τ_m + τ̃`` over the whole model, ``λ ← ‖ν‖ / mean_i ‖τ_i‖`` (the norms of the
task vectors seen so far, whole model) and ``τ_m = ν / λ``: the merged update keeps the average norm
of one task vector. FusionBench's ``opcm.py`` is the reference; its ``alpha`` default is 0.5.

Both visit every tensor twice or more (norms first), recomputing each ΔW from the adapters' factors
rather than keeping them; OPCM keeps ``τ_m`` (the result's size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from peftc.combine.deltas import TaskVectors, layer_index
from peftc.ops import as_out_in, from_out_in

Emit = Callable[[str, torch.Tensor, tuple[float, ...]], None]
"""Receives each tensor's merged task vector and the norms of the inputs' task vectors there."""


def block_count(tv: TaskVectors) -> int:
    """``L``: one more than the largest block index among the base's tensors (0 when none)."""
    found = [i for key in tv.modules.tensors if (i := layer_index(key)) is not None]
    return max(found) + 1 if found else 0


def lines_scale(key: str, blocks: int, alpha: float, beta: float) -> float:
    """``λ(l)`` of the tensor ``key``."""
    index = layer_index(key)
    if index is None:
        return alpha
    return alpha + beta * (index / (blocks - 1) if blocks > 1 else 1.0)


def lines(tv: TaskVectors, weights: Sequence[float], alpha: float | None, beta: float | None, emit: Emit) -> None:
    """LiNeS over every tensor, in order; ``emit`` receives each scaled merged task vector."""
    if alpha is None:
        summed = merged = 0.0
        for key in tv.keys:
            taus = tv.deltas(key)
            summed += float(sum(taus).abs().sum())
            merged += float(sum(w * t for w, t in zip(weights, taus, strict=True)).abs().sum())
        alpha = (summed / merged if merged > 0 else 1.0) / len(weights)
    beta = 1.0 - alpha if beta is None else beta
    blocks = block_count(tv)
    for key in tv.keys:
        taus = tv.deltas(key)
        merged_tau = sum(w * t for w, t in zip(weights, taus, strict=True))
        emit(key, merged_tau * lines_scale(key, blocks, alpha, beta), tuple(float(t.norm()) for t in taus))


def project(merged: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """``τ`` projected off the principal subspace of ``merged`` (both ``[d_out, d_in]``).

    The reference takes the full SVD and zeroes entries of ``P = Uᵀ τ V``; every zeroed entry lies in
    the leading ``k×k`` block (``k = min(d_out, d_in)``), so ``τ̃ = τ − U_k Z V_kᵀ`` with ``Z`` those
    entries is the same matrix from the thin SVD, without the ``d×d`` factors.
    """
    if not bool(merged.any()):
        return tau
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    split = int((s.cumsum(0) / s.sum() > alpha).to(torch.int64).argmax())
    p = u.T @ tau @ vh.T
    zeroed = torch.diag_embed(p.diagonal())
    zeroed[:split, :split] = p[:split, :split]
    return tau - u @ zeroed @ vh


def opcm(
    tv: TaskVectors, weights: Sequence[float], order: Sequence[int], alpha: float
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, ...]]]:
    """The OPCM merge of the adapters in ``order``: ``{key: τ_m}``, and per key the inputs' ``‖τ_i‖``
    (in adapter order)."""
    layouts = {key: tv.layout(key) for key in tv.keys}
    inputs = {key: [0.0] * len(weights) for key in tv.keys}
    merged: dict[str, torch.Tensor] = {}
    norms: list[float] = []
    scale = 1.0
    for step, index in enumerate(order):
        taus = {}
        for key in tv.keys:
            tau = tv.delta(index, key)
            inputs[key][index] = float(tau.norm())
            taus[key] = weights[index] * tau
        norms.append(_norm(taus.values()))
        if not step:
            merged = taus
            continue
        for key, tau in taus.items():
            layout = layouts[key]
            if layout is not None:
                m, t = as_out_in(merged[key], layout), as_out_in(tau, layout)
                tau = from_out_in(project(m, t, alpha), tau, layout)
            merged[key] = scale * merged[key] + tau
        average = sum(norms) / len(norms)
        total = _norm(merged.values())
        scale = total / average if average > 0 else 1.0
        merged = {key: value / scale for key, value in merged.items()} if total > 0 else merged
    return merged, {key: tuple(values) for key, values in inputs.items()}


def _norm(tensors) -> float:
    return float(sum(float(t.pow(2).sum()) for t in tensors)) ** 0.5
