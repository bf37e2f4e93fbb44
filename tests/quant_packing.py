"""An independent GPTQ / AWQ packer for the tests, written from the published formulas (FORMATS.md §3):
quantize a random weight with known scales and zeros, then lay the codes out bit by bit."""

from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def words_from_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``values [m, ...]`` along axis 0 as one bit stream per column: value j at bits j·bits…, LSB first."""
    m = values.shape[0]
    stream = np.zeros((m * bits, *values.shape[1:]), dtype=np.uint64)
    for j in range(m):
        for b in range(bits):
            stream[j * bits + b] = (values[j].astype(np.uint64) >> np.uint64(b)) & np.uint64(1)
    words = np.zeros((m * bits // 32, *values.shape[1:]), dtype=np.uint64)
    for w in range(words.shape[0]):
        for b in range(32):
            words[w] |= stream[w * 32 + b] << np.uint64(b)
    return words.astype(np.uint32).view(np.int32)


def quantize(weight: torch.Tensor, group: torch.Tensor, groups: int, bits: int, gen: torch.Generator):
    """Asymmetric min/max codes ``q [in, out]``, zeros and fp16 scales ``[groups, out]`` of ``weight [out, in]``
    with input row i in ``group[i]``; zeros are drawn in [1, 2^bits − 1] (v1 stores zero − 1 ≥ 0)."""
    w = weight.t().double()
    top = (1 << bits) - 1
    scales = torch.empty(groups, w.shape[1], dtype=torch.float64)
    for g in range(groups):
        rows = w[group == g]
        scales[g] = (rows.amax(0) - rows.amin(0)).clamp(min=1e-3) / top
    scales = scales.half()
    zeros = torch.randint(1, top + 1, (groups, w.shape[1]), generator=gen)
    q = (w / scales.double()[group]).round().long() + zeros[group]
    return q.clamp(0, top), zeros, scales


def truth(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``W[o, i] = s[g(i), o] · (q[i, o] − z[g(i), o])`` from the unpacked codes, as fp32 ``[out, in]``."""
    return (scales.float()[group] * (q - zeros[group]).float()).t()


def gptq(q, zeros, scales, group, bits: int, version: int, g_idx: bool) -> dict[str, torch.Tensor]:
    """GPTQ tensors: codes along the input rows, zeros (minus one in v1) along the output columns."""
    stored = zeros - (1 if version == 1 else 0)
    found = {
        "qweight": torch.from_numpy(words_from_bits(q.numpy(), bits)),
        "qzeros": torch.from_numpy(words_from_bits(stored.t().numpy(), bits).T.copy()),
        "scales": scales,
    }
    if g_idx:
        found["g_idx"] = group.to(torch.int32)
    return found


def awq(q, zeros, scales) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors: 8 columns per word, column ``8w + ORDER[j]`` at bits 4j."""

    def pack(values: torch.Tensor) -> torch.Tensor:
        rows, cols = values.shape
        out = np.zeros((rows, cols // 8), dtype=np.uint32)
        v = values.numpy().astype(np.uint32)
        for w in range(cols // 8):
            for j, col in enumerate(AWQ_ORDER):
                out[:, w] |= v[:, 8 * w + col] << np.uint32(4 * j)
        return torch.from_numpy(out.view(np.int32))

    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales}
