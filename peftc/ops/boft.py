"""BOFT as a weight transform (``shared/methods.md`` §3; PEFT ``peft_type: "BOFT"``).

BOFT (butterfly OFT) rotates a layer's input by a product of ``N`` butterfly factors and scales its
output channels. Each factor ``F_i = P_i B_i P_iᵀ`` is a block-diagonal ``B_i`` of ``D`` orthogonal
``H×H`` blocks, conjugated by a fixed butterfly permutation ``P_i``; every block is the Cayley
transform of the skew-symmetric part of a trained ``H×H`` matrix::

    B_i,j = (I + K)⁻¹(I − K),   K = (A − Aᵀ)/2,   A = boft_R[i, j]
    R = F_{N−1} ⋯ F_1 F_0,      y = s ⊙ ((x R) Mᵀ)   ⇔   M' = diag(s) · M Rᵀ

with ``M`` the weight as ``[d_out, d_in]`` (``nn.Conv2d``: flattened to ``[d_out, c·kh·kw]``) and
``s = boft_s`` one factor per output channel (the bias is not scaled). ``M Rᵀ`` is applied factor by
factor, ``F_0ᵀ`` first, without building any ``d_in × d_in`` matrix: ``M F_iᵀ`` is ``M`` with its
columns gathered by ``P_i⁻¹``, rotated block by block, and gathered back by ``P_i``.

``P_i`` (``i ≥ 1``; ``P_0`` is the identity) splits the ``d_in`` indices into ``D/2^i`` equal groups
and, inside each group, reorders its chunks of ``H/2`` indices: even-numbered chunks first, then the
odd-numbered ones. ``(P_i)[a, perm[a]] = 1``, so ``F_i[a, c] = B_i[perm[a], perm[c]]``; both
gathers are reshapes and transposes (:func:`butterfly_gather`).

The Cayley transform is the exact one of ``peftc/ops/oft.py`` (elimination that exports to ONNX).
"""

from __future__ import annotations

import torch

from peftc.ops.base import SiteOp, as_out_in, from_out_in, weight_op
from peftc.ops.oft import cayley, rotate_columns

BOFT_WEIGHT = SiteOp(name="boft_weight", form="weight", tensor_roles=("boft_R", "boft_s"), scalars=("layout",))


@weight_op("boft_weight(Tensor weight, Tensor boft_r, Tensor boft_s, str layout) -> Tensor")
def boft_weight(weight: torch.Tensor, boft_r: torch.Tensor, boft_s: torch.Tensor, layout: str) -> torch.Tensor:
    """``diag(s)·M·Rᵀ`` for BOFT's butterfly rotation ``R`` (fp32, cast back to ``weight``'s dtype).

    Args:
        boft_r: ``[N, D, H, H]``: ``N`` butterfly factors of ``D`` blocks of size ``H``.
        boft_s: one scale per output channel (``[d_out, 1]`` or ``[1, d_out]``).
        layout: ``linear`` or ``conv``.
    """
    factors, count, size = boft_r.shape[0], boft_r.shape[1], boft_r.shape[2]
    a = boft_r.to(torch.float32).reshape(factors * count, size, size)
    blocks = cayley(0.5 * (a - a.transpose(1, 2))).reshape(factors, count, size, size)
    matrix = as_out_in(weight.to(torch.float32), layout)
    for i in range(factors):  # M Rᵀ = M F_0ᵀ F_1ᵀ ⋯; P_0 is the identity, so factor 0 needs no gathers
        groups = count // 2**i
        gathered = butterfly_gather(matrix, groups, size // 2, inverse=True) if i else matrix
        matrix = rotate_columns(gathered, blocks[i], transpose=True)
        matrix = butterfly_gather(matrix, groups, size // 2, inverse=False) if i else matrix
    scaled = matrix * boft_s.to(torch.float32).reshape(-1, 1)
    return from_out_in(scaled, weight, layout).to(weight.dtype)


def butterfly_gather(matrix: torch.Tensor, groups: int, chunk: int, *, inverse: bool) -> torch.Tensor:
    """``matrix[:, perm]`` (or ``matrix[:, perm⁻¹]``) for BOFT's butterfly permutation ``perm``.

    Chunk ``c = 2p + e`` of a group moves to position ``e·(chunks/2) + p`` (even chunks first):
    a transpose of a ``[chunks/2, 2]`` grid, written as reshapes so it exports without index tensors.
    """
    rows, columns = matrix.shape
    half = columns // groups // chunk // 2
    grid = (rows, groups, 2, half, chunk) if inverse else (rows, groups, half, 2, chunk)
    return matrix.reshape(grid).transpose(2, 3).reshape(rows, columns)
