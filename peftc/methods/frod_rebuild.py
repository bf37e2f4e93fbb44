"""FRoD's projections rebuilt as PEFT rebuilds them when an adapter was saved without them.

With ``save_projection=false`` PEFT computes, when it loads the adapter, one basis ``V`` per module
category from the base weights of every targeted ``nn.Linear`` / ``Conv1D`` (a ``Conv1D`` weight
transposed to ``[d_out, d_in]``), and draws each category's sparse positions from
``projection_prng_key``. peftc does the same, step by step:

* modules are grouped by layer (the number after a ``layers`` path segment, else the first numeric
  segment, else a running count of the targets without one) and category (``frod.category``); a
  later module of the same layer and category replaces an earlier one, as in PEFT's dictionary;
* per category, in sorted order, the layers' weights (fp32, by layer number) are stacked
  ``[Σ d_out, d_in]``. Fewer rows than columns: ``V`` is the full right-singular basis (``Vhᵀ`` of
  ``torch.linalg.svd``). Otherwise, with ``Q R`` the QR factorisation and ``Q_ℓ`` each layer's rows of
  ``Q``, ``T = mean_ℓ (Q_ℓᵀ Q_ℓ + α I)⁻¹`` (``α``: ``regularization_alpha``) and ``V = Rᵀ E`` with
  ``E`` the eigenvectors of ``T`` (``torch.linalg.eigh``). ``V`` takes the first layer's dtype;
* one CPU ``torch.Generator`` seeded with ``projection_prng_key`` then draws, per category in the
  same order, ``nnz = min(⌊d_in² · sparse_rate⌋, d_in² − d_in)`` (at least 1 when ``sparse_rate > 0``)
  off-diagonal positions: a ``randperm`` of the off-diagonal ``(row, column)`` pairs in row-major
  order, its first ``nnz``.

The decompositions run in peftc's torch; they match the training run's only if its torch (and
LAPACK) computed the same numbers, which the parser says in a warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from peftc.ir.modules import ModuleTable


def layer_index(path: str, fallback: int) -> int:
    """The layer a module belongs to, as PEFT reads it from the path (``fallback`` when it has none)."""
    parts = path.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    return next((int(p) for p in parts if p.isdigit()), fallback)


def basis(matrices: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """One category's ``V`` from its layers' fp32 weights (module docstring)."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    total = torch.zeros((dim, dim), dtype=r.dtype)
    start = 0
    for matrix in matrices:
        block = q[start : start + matrix.shape[0], :]
        start += matrix.shape[0]
        total += torch.linalg.inv(block.T @ block + alpha * torch.eye(dim, dtype=r.dtype))
    return r.T @ torch.linalg.eigh(total / len(matrices))[1]


def positions(size: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``[2, nnz]`` off-diagonal positions of a ``[size, size]`` matrix drawn from ``generator``."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pairs = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    nnz = min(int(size * size * rate), pairs.shape[0])
    if rate > 0 and pairs.shape[0] > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    return pairs[torch.randperm(pairs.shape[0], generator=generator)[:nnz]].t().contiguous()


def rebuild(
    modules: ModuleTable, targets: Iterable[str], category_of: Mapping[str, str], seed: int, rate: float, alpha: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Category → ``(V, positions)`` for the targeted linear layers ``targets`` (in module order).

    Raises:
        KeyError: naming a target whose base weight the program does not hold.
    """
    weights: dict[int, dict[str, torch.Tensor]] = {}
    for fallback, path in enumerate(targets):  # PEFT counts every target, numbered or not
        module = modules[path]
        weight = modules.tensors[module.params["weight"]]
        weight = weight.T if module.class_name == "Conv1D" else weight
        index = layer_index(path, fallback)
        weights.setdefault(index, {})[category_of[path]] = weight.detach()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name in sorted({c for layer in weights.values() for c in layer}):
        matrices = [layer[name].to(torch.float32) for _, layer in sorted(weights.items()) if name in layer]
        first = next(layer[name] for layer in weights.values() if name in layer)
        v = basis(matrices, alpha).to(first.dtype)
        out[name] = (v, positions(v.shape[0], rate, generator))
    return out
