"""Unpacking ``bits``-wide unsigned codes from int32 words, low bits first, as GPTQ and AWQ store them.

A run of words is read as one little-endian bit stream: code ``j`` occupies bits ``[j·bits, (j+1)·bits)``.
For 2, 4 and 8 bits that is ``(word >> (bits·(j % per_word))) & mask``; 3-bit codes straddle words
(32 codes in 3 words), which the same stream rule covers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The int64 codes of int32 ``packed`` along ``dim`` (``32/bits`` times longer there), low bits first."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.movedim(dim, -1)
    period_words = bits // math.gcd(32, bits)
    period_codes = period_words * 32 // bits
    runs = words.reshape(*words.shape[:-1], -1, period_words)
    mask = (1 << bits) - 1
    codes = []
    for j in range(period_codes):
        word, shift = divmod(j * bits, 32)
        value = runs[..., word] >> shift
        if shift + bits > 32:
            value = value | (runs[..., word + 1] << (32 - shift))
        codes.append(value & mask)
    out = torch.stack(codes, dim=-1).reshape(*words.shape[:-1], -1)
    return out.movedim(-1, dim)


def packed_length(count: int, bits: int) -> int | None:
    """How many int32 words hold ``count`` codes; None when they do not fill whole periods."""
    period_words = bits // math.gcd(32, bits)
    period_codes = period_words * 32 // bits
    if count % period_codes:
        return None
    return count // period_codes * period_words


def tensor(tensors: Mapping[str, torch.Tensor], key: str, name: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """``tensors[name]``, refusing a missing one or one of another dtype (naming ``key.name``)."""
    if name not in tensors:
        raise InputError(f"{key}.{name}: missing (the quantized layer has {sorted(tensors)})")
    value = tensors[name]
    if value.dtype not in dtypes:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise InputError(f"{key}.{name}: dtype {str(value.dtype).removeprefix('torch.')}; expected {wanted}")
    return value


def expect_shape(value: torch.Tensor, shape: tuple[int, ...], key: str, name: str, why: str) -> None:
    """Refuse ``value`` unless it is ``shape``, naming ``key.name`` and where the shape comes from."""
    if tuple(value.shape) != shape:
        raise InputError(f"{key}.{name}: shape {list(value.shape)}, expected {list(shape)} ({why})")


def int_field(config: Mapping[str, Any], key: str, field: str, allowed: tuple[int, ...]) -> int:
    """An integer ``quantization_config`` field among ``allowed``."""
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{key}: quantization_config.{field} is {value!r}; expected an integer")
    if value not in allowed:
        raise UnsupportedError(
            f"{key}: quantization_config.{field} = {value}; peftc reads {', '.join(map(str, allowed))}"
        )
    return value


def group_size(config: Mapping[str, Any], key: str, in_features: int) -> int:
    """``quantization_config.group_size`` with -1 (one group per column) resolved to ``in_features``."""
    value = config.get("group_size", -1)
    if not isinstance(value, int) or isinstance(value, bool) or (value <= 0 and value != -1):
        raise InputError(f"{key}: quantization_config.group_size is {value!r}; expected a positive integer or -1")
    return in_features if value == -1 else value
