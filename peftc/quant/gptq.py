"""GPTQ checkpoints (``quant_method: "gptq"``): the packed layout and its exact dequantization.

Per linear layer at prefix ``P`` (``../shared/FORMATS.md`` §3):

* ``P.qweight`` int32 ``[in·bits/32, out]``: codes packed along the input dimension, low bits first;
* ``P.qzeros`` int32 ``[groups, out·bits/32]``: zero points packed along the output dimension;
* ``P.scales`` float16 ``[groups, out]`` with ``groups = ceil(in / group_size)``;
* ``P.g_idx`` int32 ``[in]`` (optional): the group of each input row; written by act-order
  (``desc_act``) quantization, otherwise ``i // group_size``.

``W[o, i] = scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o])`` with ``z`` the stored zero plus one in
the original ("v1") convention and the stored zero itself for ``checkpoint_format: "gptq_v2"``.
``sym`` does not change the formula (symmetric checkpoints store the mid-range zero); it is checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.quant import intpack

BITS = (2, 3, 4, 8)
FORMATS = {"gptq": 1, "gptq_v2": 2}
RUNTIME_ONLY = ("use_exllama", "exllama_config", "use_cuda_fp16", "max_input_length", "backend")
"""``quantization_config`` fields that pick kernels at load time and leave the stored numbers alone."""


def checkpoint_version(config: Mapping[str, Any], key: str) -> int:
    """1 (stored zero = z − 1) or 2 (stored zero = z), from ``checkpoint_format`` (or GPTQModel's ``format``)."""
    name = config.get("checkpoint_format", config.get("format", "gptq"))
    if name not in FORMATS:
        raise UnsupportedError(
            f"{key}: quantization_config.checkpoint_format = {name!r}; peftc reads 'gptq' (v1) and 'gptq_v2' "
            "(repacked kernel layouts such as marlin must be converted back first)"
        )
    return FORMATS[name]


def dequantize(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str) -> torch.Tensor:
    """The fp32 weight ``[out_features, in_features]`` of the GPTQ layer ``key``.

    Raises:
        InputError: a missing tensor, a packed tensor whose length disagrees with the others, a
            ``g_idx`` outside the groups, a symmetric config with asymmetric zeros.
        UnsupportedError: bits other than 2/3/4/8, a checkpoint format other than gptq / gptq_v2.
    """
    if config.get("quant_method", "gptq") != "gptq":
        raise UnsupportedError(f"{key}: quantization_config.quant_method = {config.get('quant_method')!r}; not gptq")
    bits = intpack.int_field(config, key, "bits", BITS)
    version = checkpoint_version(config, key)
    qweight = intpack.tensor(tensors, key, "qweight", (torch.int32,))
    qzeros = intpack.tensor(tensors, key, "qzeros", (torch.int32,))
    scales = intpack.tensor(tensors, key, "scales", (torch.float16, torch.bfloat16, torch.float32))
    if qweight.dim() != 2:
        raise InputError(f"{key}.qweight: rank {qweight.dim()}; expected [in·bits/32, out]")
    rows, out_features = qweight.shape
    in_features = rows * 32 // bits
    if intpack.packed_length(in_features, bits) != rows:
        raise InputError(f"{key}.qweight: {rows} rows do not hold whole {bits}-bit groups of 32 input features")
    size = intpack.group_size(config, key, in_features)
    groups = math.ceil(in_features / size)
    why = f"in_features {in_features} from qweight rows, group_size {size}, out_features {out_features}, bits {bits}"
    intpack.expect_shape(scales, (groups, out_features), key, "scales", why)
    zero_words = intpack.packed_length(out_features, bits)
    if zero_words is None:
        raise InputError(f"{key}.qzeros: out_features {out_features} does not fill whole {bits}-bit int32 words")
    intpack.expect_shape(qzeros, (groups, zero_words), key, "qzeros", why)
    g_idx = _groups(tensors, config, key, in_features, size, groups)
    if config.get("sym", False):
        _check_symmetric(intpack.unpack_codes(qzeros, bits, 1) + (1 if version == 1 else 0), bits, key, version)
    return decode(qweight, qzeros, scales, g_idx, bits, version)


def decode(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, version: int
) -> torch.Tensor:
    """The formula alone, on tensors already checked by :func:`dequantize` (no data-dependent control
    flow, so exporters can trace it): fp32 ``[out, in]``."""
    codes = intpack.unpack_codes(qweight, bits, 0)
    zeros = intpack.unpack_codes(qzeros, bits, 1) + (1 if version == 1 else 0)
    weight = scales.to(torch.float32)[g_idx] * (codes - zeros[g_idx]).to(torch.float32)
    return weight.t().contiguous()


def _groups(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str, in_features: int, size: int, groups: int
) -> torch.Tensor:
    """The group of every input row: ``g_idx`` when stored, else ``i // group_size``."""
    if "g_idx" not in tensors:
        if config.get("desc_act"):
            raise InputError(f"{key}.g_idx: missing, but quantization_config.desc_act is true (act-order)")
        return torch.arange(in_features) // size
    g_idx = intpack.tensor(tensors, key, "g_idx", (torch.int32, torch.int64))
    intpack.expect_shape(g_idx, (in_features,), key, "g_idx", "one group per input feature")
    low, high = int(g_idx.min()), int(g_idx.max())
    if low < 0 or high >= groups:
        raise InputError(f"{key}.g_idx: values in [{low}, {high}], outside the {groups} groups of scales")
    return g_idx.to(torch.int64)


def _check_symmetric(zeros: torch.Tensor, bits: int, key: str, version: int) -> None:
    """Symmetric GPTQ stores the mid-range zero ``2^(bits−1)`` (minus one in v1)."""
    mid = 1 << (bits - 1)
    if not bool((zeros == mid).all()):
        found = sorted({int(v) for v in zeros.unique()[:4]})
        stored = [v - (1 if version == 1 else 0) for v in found]
        raise InputError(
            f"{key}.qzeros: quantization_config.sym is true but stored zeros include {stored}; a symmetric "
            f"v{version} checkpoint stores {mid - (1 if version == 1 else 0)}"
        )
