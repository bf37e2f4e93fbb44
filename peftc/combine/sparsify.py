"""Trimming one task vector: keep the largest entries, a random subset (DARE), or a band below the
outliers (breadcrumbs). Each returns the trimmed tensor; the caller counts what was dropped.

* ``magnitude``: keep the ``k = int(density·n)`` entries of largest ``|τ|`` (PEFT and mergekit: the
  same rule; equal magnitudes at the cut are kept in index order).
* ``random`` (DARE): keep each entry with probability ``density`` (``m ~ Bernoulli(density)``), then
  rescale: by ``1/density`` (the DARE paper and PEFT: the expectation is kept) or so that the L1 norm
  of the tensor is kept (mergekit's ``rescale``). The mask is drawn from a generator seeded by
  ``(seed, tensor name, adapter index)``, so a tensor's mask does not depend on the order tensors are
  visited in, and one seed reproduces the result bit for bit.
* ``breadcrumbs``: drop the ``int(gamma·n)`` largest entries (outliers) and keep the next
  ``int(density·n)`` (mergekit's ``magnitude_outliers``).
"""

from __future__ import annotations

import zlib

import torch


def largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """A flat mask of the ``k`` largest of ``magnitudes`` (flat): every entry above the k-th largest
    value, then entries equal to it in index order (``kthvalue`` rather than a sort or ``topk``: one
    selection, several times faster on a large tensor)."""
    n = magnitudes.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = torch.kthvalue(magnitudes, n - k + 1).values
    mask = magnitudes > threshold
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(magnitudes == threshold).flatten()[:need]] = True
    return mask


def magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``τ`` with all but its ``int(density·n)`` largest-magnitude entries zeroed."""
    k = int(density * tau.numel())
    if k >= tau.numel():
        return tau.clone()
    return tau * largest(tau.abs().reshape(-1), k).reshape(tau.shape)


def generator(seed: int, key: str, index: int) -> torch.Generator:
    """The random stream of adapter ``index``'s mask on tensor ``key`` under ``seed``."""
    mixed = (int(seed) * 1_000_003 + zlib.crc32(key.encode()) * 8191 + index) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def random(tau: torch.Tensor, density: float, rng: torch.Generator, rescale: str) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale (``"inverse"``: ÷ density;
    ``"l1"``: to the L1 norm ``τ`` had)."""
    if density >= 1.0:
        return tau.clone()
    mask = torch.rand(tau.shape, generator=rng) < density
    kept = tau * mask
    if rescale == "inverse":
        return kept / density
    before, after = tau.abs().sum(), kept.abs().sum()
    return kept * (before / after) if after > 0 else kept


def breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """``τ`` keeping the ``int(density·n)`` entries ranked just below the ``int(gamma·n)`` largest."""
    n = tau.numel()
    top, keep = int(gamma * n), int(density * n)
    flat = tau.abs().reshape(-1)
    mask = largest(flat, top + keep) & ~largest(flat, top)  # nested: ties break by index in both
    return tau * mask.reshape(tau.shape)
