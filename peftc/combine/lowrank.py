"""``cat`` and ``svd``: combinations whose result is a low-rank update ``ΔW = B·A`` per linear weight.

* ``cat`` is exact: ``B = [B_1 … B_T]``, ``A = [w_1 A_1; …; w_T A_T]`` with each adapter's own factors
  (``B_i`` carrying its scale ``s_i``: α/r, α/√r for rsLoRA, per-module ``alpha_pattern``), so the rank
  is ``Σ r_i``. An adapter whose ΔW is not a single LoRA product (DoRA, LoHa, LoKr, (IA)³…) is
  factored exactly by SVD at its numerical rank (singular values above ``σ_max · max(m, n) · ε₃₂``),
  which is ``min(m, n)`` for a full-rank update: still exact up to fp32 rounding, only larger.
* ``svd`` sums ``ΔW = Σ w_i ΔW_i`` exactly and keeps its top ``k`` singular triplets: ``B = U_k S_k``,
  ``A = V_kᵀ`` (PEFT's split); the relative truncation error ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` is reported per
  tensor, and is 0 up to rounding when ``k`` reaches the rank of the sum. When the concatenated factors
  are thinner than the matrix, the SVD is taken through them (:func:`svd_of_factors`), not of ``ΔW``.

Both work in the ``[d_out, d_in]`` orientation (``peftc.ops.as_out_in``); a bias delta is a sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftc.combine.deltas import TaskVectors
from peftc.ops import as_out_in

EPS = float(torch.finfo(torch.float32).eps)


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B·A = delta`` up to rounding, at the numerical rank of ``delta``."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0, delta.shape[1])
    rank = int((s > s[0] * max(delta.shape) * EPS).sum())
    return (u[:, :rank] * s[:rank]).to(torch.float32), vh[:rank].to(torch.float32)


def cat(tv: TaskVectors, key: str, weights: Sequence[float], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of the concatenation on the linear weight ``key`` (adapters that do not touch it add no rank)."""
    bs, as_ = [], []
    for index, w in enumerate(weights):
        if key not in tv.changes[index]:
            continue
        factors = tv.factors(index, key)
        if factors is None:
            factors = exact_factors(as_out_in(tv.delta(index, key), layout))
        b, a = factors
        bs.append(b)
        as_.append(a * w)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def svd_of_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`svd` of ``ΔW = B·A`` given as factors ([d_out, R], [R, d_in]): QR of each side and the SVD of
    the ``R×R`` core ``R_B R_Aᵀ`` give the same singular triplets without forming ``ΔW`` (O((m+n)R²)
    instead of O(mn·min(m, n))); the error is ``√(Σ_{i>k} σ_i²) / √(Σ σ_i²)``."""
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    total = float(s.pow(2).sum())
    error = (float(s[k:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    b_k = ((qb @ u[:, :k]) * s[:k]).to(torch.float32)
    a_k = (vh[:k] @ qa.T).to(torch.float32)
    return b_k.contiguous(), a_k.contiguous(), error


def svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, relative error)`` of the best rank-``rank`` approximation of ``delta`` ([d_out, d_in])."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    norm = float(delta.norm())
    error = float((delta - b @ a).norm()) / norm if norm > 0 else 0.0
    return b.contiguous(), a.contiguous(), error
