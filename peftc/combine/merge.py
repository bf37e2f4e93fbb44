"""The per-tensor combination methods: task vectors ``τ_i`` (fp32, one tensor) and weights ``w_i`` in,
the merged ``τ`` and what was done to it out.

=================  =============================================================================
task-arithmetic    τ = Σ w_i τ_i  (a negative weight negates a task)
magnitude-prune    τ = Σ w_i · top_k(τ_i)
dare-linear        τ = Σ w_i · dare(τ_i)
ties               τ̂_i = top_k(τ_i); γ = sgn(Σ ·); τ = Σ_{i: sgn τ̂_i = γ} w_i τ̂_i / norm
dare-ties          as ties with τ̂_i = dare(τ_i)
breadcrumbs        τ = Σ w_i · band(τ_i)
pcb                τ = Σ w_i τ̂_i β_i / Σ β_i  (``peftc/combine/pcb.py``)
=================  =============================================================================

Where the references disagree, ``convention`` chooses (``shared/FORMATS.md`` §5):

===========  ============================  ==============================  ================
convention   sign election γ on            disjoint-merge divisor          DARE rescale
===========  ============================  ==============================  ================
paper        Σ w_i τ̂_i (weighted)          Σ_{agreeing} |w_i|              1/density
peft         Σ τ̂_i (unweighted)            count of agreeing entries       1/density
mergekit     Σ w_i τ̂_i (weighted)          Σ_{agreeing} w_i (ties only)    L1 norm kept
===========  ============================  ==============================  ================

``paper`` (the default) reduces to the TIES and DARE papers at unit weights (elect on the trimmed task
vectors, disjoint *mean*, rescale by 1/density), and generalises them so that a negative weight means
negation: PEFT elects signs on unweighted vectors, so a negated task votes with its original sign, and
mergekit divides by the signed sum of weights, which flips a lone negated task back. Entries where
no task vector is non-zero stay zero. A sign is elected positive on a tie (γ = +1 where the sum is 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from peftc.combine import pcb, sparsify
from peftc.combine.options import SPARSE, CombineOptions


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """What one tensor's combination did."""

    trimmed: float
    """Fraction of the inputs' non-zero entries the sparsification zeroed (mean over adapters)."""
    conflicts: int
    """Entries where a non-zero trimmed task vector disagreed with the elected sign (it was dropped)."""
    norm: float
    """‖τ‖_F of the result."""
    input_norms: tuple[float, ...]
    """‖τ_i‖_F of each input, before trimming."""


def combine_tensor(taus: Sequence[torch.Tensor], options: CombineOptions, key: str) -> tuple[torch.Tensor, TensorStats]:
    """The merged task vector of one tensor (before ``options.scale``) and its stats.

    Args:
        taus: each adapter's task vector on this tensor (fp32, same shape).
        options: the method and parameters, with one weight per adapter.
        key: the tensor's name (seeds DARE's masks).
    """
    weights = options.weights or (1.0,) * len(taus)
    method = options.method
    trimmed = [_trim(tau, options, key, index) for index, tau in enumerate(taus)]
    conflicts = 0
    if method in ("ties", "dare-ties"):
        merged, conflicts = _consensus(trimmed, weights, options.convention, method)
    elif method == "pcb":
        merged, trimmed = pcb.merge(taus, weights, options.kept)
    else:
        merged = torch.zeros_like(taus[0])
        for w, tau in zip(weights, trimmed, strict=True):
            merged = merged + w * tau
    stats = TensorStats(
        trimmed=_trimmed_fraction(taus, trimmed) if method in (*SPARSE, "pcb") else 0.0,
        conflicts=conflicts,
        norm=float(merged.norm()),
        input_norms=tuple(float(t.norm()) for t in taus),
    )
    return merged, stats


def _trim(tau: torch.Tensor, options: CombineOptions, key: str, index: int) -> torch.Tensor:
    method = options.method
    if method in ("ties", "magnitude-prune"):
        return sparsify.magnitude(tau, options.kept)
    if method in ("dare-linear", "dare-ties"):
        rescale = "l1" if options.convention == "mergekit" else "inverse"
        return sparsify.random(tau, options.kept, sparsify.generator(options.seed, key, index), rescale)
    if method == "breadcrumbs":
        return sparsify.breadcrumbs(tau, options.kept, options.gamma)
    return tau


def elect(trimmed: Sequence[torch.Tensor], weights: Sequence[float], convention: str) -> torch.Tensor:
    """γ: +1 / −1 per entry, from the sum of the (weighted, unless ``peft``) trimmed task vectors."""
    total = torch.zeros_like(trimmed[0])
    for w, tau in zip(weights, trimmed, strict=True):
        total = total + (tau if convention == "peft" else w * tau)
    return torch.where(total >= 0, 1.0, -1.0)


def _consensus(
    trimmed: Sequence[torch.Tensor], weights: Sequence[float], convention: str, method: str
) -> tuple[torch.Tensor, int]:
    """Sign election and disjoint merge (see the module docstring's table)."""
    sign = elect(trimmed, weights, convention)
    merged = torch.zeros_like(trimmed[0])
    divisor = torch.zeros_like(trimmed[0])
    conflicts = torch.zeros(trimmed[0].shape, dtype=torch.bool)
    for w, tau in zip(weights, trimmed, strict=True):
        voted = tau.sign()
        if convention != "peft" and w <= 0:  # the sign of w·τ
            voted.mul_(-1.0 if w < 0 else 0.0)
        agree = voted == sign
        conflicts.logical_or_(voted.ne(0).logical_and_(agree.logical_not()))
        merged.add_(torch.where(agree, tau, 0.0), alpha=w)
        share = 1.0 if convention == "peft" else abs(w) if convention == "paper" else w
        divisor.add_(agree.to(merged.dtype), alpha=share)
    if convention == "peft":
        merged = merged / divisor.clamp(min=1.0)
    elif convention == "paper":
        merged = merged / torch.where(divisor > 0, divisor, 1.0)
    elif method == "ties":  # mergekit normalises ties by the agreeing weights, not dare-ties (FORMATS.md §5)
        merged = merged / torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    return merged, int(conflicts.sum())


def _trimmed_fraction(taus: Sequence[torch.Tensor], trimmed: Sequence[torch.Tensor]) -> float:
    fractions = []
    for tau, kept in zip(taus, trimmed, strict=True):
        nonzero = int(torch.count_nonzero(tau))
        if nonzero:
            fractions.append(1.0 - int(torch.count_nonzero(kept)) / nonzero)
    return sum(fractions) / len(fractions) if fractions else 0.0
