"""AWQ GEMM checkpoints (``quant_method: "awq"``, ``version: "gemm"``): layout and exact dequantization.

Per linear layer at prefix ``P`` (``../shared/FORMATS.md`` §3):

* ``P.qweight`` int32 ``[in, out/8]``: 4-bit codes packed along the *output* dimension; word ``w`` of a
  row holds the columns ``8w + ORDER[j]`` at bits ``4j`` (``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``);
* ``P.qzeros`` int32 ``[in/group_size, out/8]``: zero points packed the same way;
* ``P.scales`` float16 ``[in/group_size, out]``.

``W[o, i] = scales[i // gs, o] · (q[i, o] − z[i // gs, o])`` (no ``+1``: AWQ stores the zero itself).
GEMV, GEMV-fast, exllama, marlin and ipex checkpoints repack the codes for their kernels and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.quant import intpack

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""The column each nibble of a word holds, nibble ``j`` at bits ``4j``."""
REVERSE = tuple(ORDER.index(c) for c in range(8))
"""The nibble holding each of a word's 8 columns: ``(0, 4, 1, 5, 2, 6, 3, 7)``."""


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """The int64 codes ``[rows, 8·words]`` of AWQ-packed int32 ``[rows, words]``, in column order."""
    nibbles = intpack.unpack_codes(packed, 4, 1)
    rows, count = nibbles.shape
    by_word = nibbles.reshape(rows, count // 8, 8)
    return torch.stack([by_word[:, :, n] for n in REVERSE], dim=2).reshape(rows, count)  # no index tensor: traceable


def dequantize(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str) -> torch.Tensor:
    """The fp32 weight ``[out_features, in_features]`` of the AWQ GEMM layer ``key``.

    Raises:
        InputError: a missing tensor, a packed tensor whose shape disagrees with the others, a group
            size that does not divide ``in_features``.
        UnsupportedError: bits other than 4, a kernel layout other than GEMM, ``zero_point: false``.
    """
    if config.get("quant_method", "awq") != "awq":
        raise UnsupportedError(f"{key}: quantization_config.quant_method = {config.get('quant_method')!r}; not awq")
    intpack.int_field(config, key, "bits", (4,))
    for field in ("version", "format"):  # transformers' AwqConfig writes both, AutoAWQ ``version`` only
        if str(config.get(field, "gemm")).lower() != "gemm":
            raise UnsupportedError(
                f"{key}: quantization_config.{field} = {config.get(field)!r}; peftc reads the GEMM layout only "
                "(GEMV, exllama, marlin and ipex repack the codes for their kernels)"
            )
    if config.get("zero_point", True) is not True:
        raise UnsupportedError(
            f"{key}: quantization_config.zero_point = {config.get('zero_point')!r}; AWQ GEMM stores zeros"
        )
    qweight = intpack.tensor(tensors, key, "qweight", (torch.int32,))
    qzeros = intpack.tensor(tensors, key, "qzeros", (torch.int32,))
    scales = intpack.tensor(tensors, key, "scales", (torch.float16, torch.bfloat16, torch.float32))
    if qweight.dim() != 2:
        raise InputError(f"{key}.qweight: rank {qweight.dim()}; expected [in, out/8]")
    in_features, words = qweight.shape
    out_features = words * 8
    size = intpack.group_size(config, key, in_features)
    if in_features % size:
        raise InputError(
            f"{key}: quantization_config.group_size {size} does not divide in_features {in_features} (qweight rows)"
        )
    groups = in_features // size
    why = f"in_features {in_features}, group_size {size}, out_features {out_features}"
    intpack.expect_shape(scales, (groups, out_features), key, "scales", why)
    intpack.expect_shape(qzeros, (groups, words), key, "qzeros", why)
    return decode(qweight, qzeros, scales, torch.arange(in_features) // size)


def decode(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The formula alone, on tensors already checked by :func:`dequantize` (``rows``: the group of each
    input row, ``i // group_size``; traceable by exporters): fp32 ``[out, in]``."""
    codes = unpack_columns(qweight)
    zeros = unpack_columns(qzeros)[rows]
    weight = scales.to(torch.float32)[rows] * (codes - zeros).to(torch.float32)
    return weight.t().contiguous()
