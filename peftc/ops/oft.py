"""OFT as a weight transform (``shared/methods.md`` §3; PEFT ``peft_type: "OFT"``).

OFT rotates what a layer reads by a block-diagonal orthogonal matrix ``R = diag(R_1, …, R_k)`` of
``b×b`` blocks (``block_share``: one block, repeated). With the weight viewed as a matrix ``M``
(``[d_out, d_in]``; a convolution kernel flattened to ``[d_out, c·kh·kw]``, the order PEFT's merge
uses) the rotation folds into the weight::

    nn.Linear, nn.Conv2d:  y = (x R) Mᵀ          ⇔  M' = M Rᵀ
    nn.Embedding:          row_i ↦ row_i R       ⇔  M' = M R

Each block is parametrised by the ``b(b-1)/2`` strictly-upper-triangular entries ``q`` of a
skew-symmetric ``S = U(q) − U(q)ᵀ`` (row-major, as ``torch.triu_indices`` orders them), and

    Cayley (use_cayley_neumann=False):  R_j = (I + S)⁻¹ (I − S)
    Cayley–Neumann (n terms):            R_j = I + 2S + 2S² + … + 2S^{m−1} + S^m,   m = max(3, n − 1)
                                         (n = 2: I + 2S;  n ≤ 1: I)

The truncated series is ``(I + S)(I + S + … + S^{m−1})``, an approximation of ``(I + S)(I − S)⁻¹``:
the *transpose* of the exact form above. PEFT's two parametrisations differ so, and peftc
reproduces each as PEFT computes it.

``coft`` (constrained OFT) first shrinks each block: ``S ← S`` if ``‖S‖_F ≤ ε'`` else
``S·ε'/‖S‖_F``, with ``ε' = eps/√(stored blocks)``. PEFT writes the projection back into its
parameter on every forward; projecting is idempotent, so its eval output is that of the projected
``S`` computed here.

The exact inverse is Gauss–Jordan elimination unrolled over the (static) block size, because
``torch.linalg.solve``/``inv`` have no ONNX translation. It needs no pivoting: ``I + S`` has
symmetric part ``I``, so every pivot is positive and element growth is bounded.
"""

from __future__ import annotations

import math

import torch

from peftc.ops.base import SiteOp, as_out_in, from_out_in, weight_op

OFT_WEIGHT = SiteOp(
    name="oft_weight",
    form="weight",
    tensor_roles=("oft_R",),
    scalars=("block_size", "cayley_neumann", "neumann_terms", "coft", "eps", "layout"),
)


@weight_op(
    "oft_weight(Tensor weight, Tensor oft_r, int block_size, bool cayley_neumann, int neumann_terms, "
    "bool coft, float eps, str layout) -> Tensor"
)
def oft_weight(
    weight: torch.Tensor,
    oft_r: torch.Tensor,
    block_size: int,
    cayley_neumann: bool,
    neumann_terms: int,
    coft: bool,
    eps: float,
    layout: str,
) -> torch.Tensor:
    """``weight`` with its input rotated by OFT's block-diagonal ``R`` (fp32, cast back to its dtype).

    Args:
        oft_r: ``[blocks, b(b-1)/2]`` upper-triangular entries, one row per block (one row with
            ``block_share``, repeated across the input).
        block_size: ``b``.
        cayley_neumann: use the truncated Neumann series of ``neumann_terms`` terms instead of the
            exact Cayley transform.
        coft: project each block to Frobenius norm ``≤ eps/√blocks`` first.
        layout: ``linear`` / ``conv`` (``M' = M Rᵀ``) or ``embedding`` (``M' = M R``).
    """
    s = skew_from_upper(oft_r.to(torch.float32), block_size)
    if coft:
        s = project(s, eps / math.sqrt(s.shape[0]))
    blocks = cayley_neumann_series(s, neumann_terms) if cayley_neumann else cayley(s)
    matrix = as_out_in(weight.to(torch.float32), layout)
    rotated = rotate_columns(matrix, blocks, transpose=layout != "embedding")
    return from_out_in(rotated, weight, layout).to(weight.dtype)


def skew_from_upper(upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[n, b(b-1)/2]`` strictly-upper entries (row-major) → ``[n, b, b]`` skew-symmetric ``U − Uᵀ``."""
    # Gather from the vector with a zero prepended: entry (i, j), i < j, is its element
    # i(2b − i − 3)/2 + j (1-based, row-major); position 0 fills the diagonal and lower triangle.
    # The index is computed with tensor ops, not built from a Python list: a tensor constant made
    # inside a composite op's body is not registered when an exporter decomposes the op.
    i = torch.arange(block_size).unsqueeze(1)
    j = torch.arange(block_size).unsqueeze(0)
    index = torch.where(j > i, i * (2 * block_size - i - 3) // 2 + j, 0).reshape(-1)
    padded = torch.cat([upper.new_zeros(upper.shape[0], 1), upper], dim=1)
    u = padded[:, index].reshape(-1, block_size, block_size)
    return u - u.transpose(1, 2)


def project(s: torch.Tensor, limit: float) -> torch.Tensor:
    """Each ``[b, b]`` block scaled down to Frobenius norm ``limit`` if it is larger (COFT)."""
    norm = torch.linalg.vector_norm(s, dim=(1, 2), keepdim=True)
    return torch.where(norm <= limit, s, s / norm * limit)


def cayley(s: torch.Tensor) -> torch.Tensor:
    """``(I + S)⁻¹(I − S)`` for a batch of skew-symmetric ``S`` (equal to ``(I − S)(I + S)⁻¹``)."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype).expand_as(s)
    return solve_unpivoted(eye + s, eye - s)


def cayley_neumann_series(s: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's Cayley–Neumann rotation ``I + 2S + … + 2S^{m−1} + S^m`` (module docstring)."""
    rotation = torch.eye(s.shape[-1], dtype=s.dtype).expand_as(s)
    if terms <= 1:
        return rotation.clone()
    rotation = rotation + 2 * s
    if terms == 2:
        return rotation
    last = max(3, terms - 1)
    power = s
    for _ in range(2, last):
        power = power @ s
        rotation = rotation + 2 * power
    return rotation + power @ s


def solve_unpivoted(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``a⁻¹·rhs`` for a batch ``[n, b, b]`` by Gauss–Jordan elimination without pivoting.

    Only for matrices whose symmetric part is positive definite (``I + S``, ``S`` skew), where
    elimination without pivoting is stable. Written with plain tensor ops so it exports to ONNX.
    """
    size = a.shape[-1]
    augmented = torch.cat([a, rhs], dim=-1)
    eye = torch.eye(size, dtype=a.dtype)
    for k in range(size):
        pivot_row = augmented[:, k : k + 1, :] / augmented[:, k : k + 1, k : k + 1]
        # Subtracting (column k − e_k) ⊗ pivot row clears column k elsewhere and sets row k to the
        # normalised pivot row, without writing in place.
        augmented = augmented - (augmented[:, :, k : k + 1] - eye[:, k : k + 1]) * pivot_row
    return augmented[:, :, size:]


def rotate_columns(matrix: torch.Tensor, blocks: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """``matrix·diag(blocks)ᵀ`` (``transpose``) or ``matrix·diag(blocks)`` over ``[rows, k·b]`` columns.

    ``blocks`` is ``[k, b, b]``, or ``[1, b, b]`` repeated ``k`` times (``block_share``).
    """
    rows, columns = matrix.shape
    size = blocks.shape[-1]
    count = columns // size
    blocks = blocks.expand(count, size, size)
    if transpose:
        blocks = blocks.transpose(1, 2)
    grouped = matrix.reshape(rows, count, size).transpose(0, 1)  # [k, rows, b]
    return (grouped @ blocks).transpose(0, 1).reshape(rows, columns)
