"""Independent reference implementations of the combination methods, written from the formulas in
``shared/FORMATS.md`` §5 and the papers — not from ``peftc/combine`` — for the tests to compare with.

mergekit is not installed beside this project's torch (its pins pull another torch), so its
``generalized_task_arithmetic`` is transcribed here from FORMATS.md §5: sparsify → weight → sign
consensus on the WEIGHTED deltas → masked sum → divide by the agreeing weights (when normalising).
PEFT's own ``peft.utils.merge_utils`` is used as is, applied to ΔW.
"""

from __future__ import annotations

import re

import torch


def weighted_sum(taus, weights):
    out = torch.zeros_like(taus[0])
    for w, t in zip(weights, taus, strict=True):
        out += w * t
    return out


def keep_largest(t, density):
    """Top int(density·n) by |t|, via a full stable sort (not topk)."""
    k = int(density * t.numel())
    flat = t.flatten()
    mask = torch.zeros(flat.numel())
    mask[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = 1.0
    return (flat * mask).reshape(t.shape)


def dare_mask(shape, density, generator):
    """The documented mask protocol: keep where ``torch.rand(shape, generator) < density``."""
    return torch.rand(shape, generator=generator) < density


def mergekit_gta(taus, weights, *, consensus, normalize):
    """mergekit's generalized task arithmetic on already-sparsified task vectors."""
    weighted = torch.stack([w * t for w, t in zip(weights, taus, strict=True)])
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * taus[0].dim()))
    if consensus:
        total = weighted.sum(0)
        sign = (total >= 0).float() * 2 - 1
        mask = weighted.sign() == sign
    else:
        mask = torch.ones_like(weighted, dtype=torch.bool)
    mixed = (weighted * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor.abs() < 1e-8] = 1
        mixed = mixed / divisor
    return mixed


def l1_rescaled(t, kept):
    """mergekit's DARE rescale: keep the L1 norm."""
    return kept * (t.abs().sum() / kept.abs().sum())


def pcb(taus, weights, ratio):
    """PCB-merging per tensor, from the reference's formulas (clip, intra·inter, keep top ratio, min-max)."""
    x = torch.stack([t.flatten() for t in taus])
    n, d = x.shape

    def minmax(v):
        lo, hi = v.min(1, keepdim=True).values, v.max(1, keepdim=True).values
        return (v - lo) / torch.clamp(hi - lo, min=1e-12)

    def clip(v, lo_ratio, hi_ratio):
        s = torch.sort(v, 1).values
        lo, hi = s[:, int(d * lo_ratio)].unsqueeze(1), s[:, int(d * (1 - hi_ratio)) - 1].unsqueeze(1)
        return torch.clamp(v, lo, hi)

    mag = clip(x.abs(), 0.0001, 0.0001)
    signed = torch.sign(x) * mag
    score = torch.exp(n * minmax(mag) ** 2) * torch.tanh(x * x.sum(0))
    scale = minmax(clip(score, 1 - ratio, 0))
    lam = torch.tensor(weights).reshape(-1, 1)
    return ((lam * signed * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)).reshape(taus[0].shape)


def lines(merged: dict, blocks: int, alpha: float, beta: float) -> dict:
    """LiNeS: keys with ``.l.`` scaled by α + β·l/(L−1), others by α."""
    out = {}
    for key, t in merged.items():
        found = re.search(r"\.(\d+)\.", key)
        factor = alpha + beta * int(found.group(1)) / (blocks - 1) if found else alpha
        out[key] = t * factor
    return out


def opcm(task_vectors: list[dict], alpha: float, linear: set[str]) -> dict:
    """OPCM (FusionBench ``opcm.py``'s loop): merged task vector after all tasks, in order."""
    merged = {k: v.clone() for k, v in task_vectors[0].items()}
    norms = [_norm(task_vectors[0])]
    lam = 1.0
    for tv in task_vectors[1:]:
        norms.append(_norm(tv))
        avg = sum(norms) / len(norms)
        new = {}
        for key, tau in tv.items():
            # peftc's documented rule: where the merge so far is zero there is no subspace to avoid
            # (the reference would project onto the arbitrary singular vectors of a zero matrix).
            if key in linear and merged[key].any():
                u, s, vh = torch.linalg.svd(merged[key], full_matrices=True)
                split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                p = u.T @ tau @ vh.T
                p.diagonal().fill_(0)
                p[:split, :split] = 0
                tau = u @ p @ vh
            new[key] = lam * merged[key] + tau
        total = _norm(new)
        lam = total / avg
        merged = {k: v * (avg / total) for k, v in new.items()}
    return merged


def _norm(tensors: dict) -> float:
    return float(torch.cat([t.flatten() for t in tensors.values()]).norm())
