"""bitsandbytes checkpoints (``quant_method: "bitsandbytes"``): 4-bit NF4/FP4 and 8-bit LLM.int8.

Per linear layer at prefix ``P``, as transformers saves a quantized model (``../shared/FORMATS.md`` §3):

* 4-bit: ``P.weight`` uint8 ``[ceil(out·in/2), 1]``, two codes a byte, the even element in the HIGH
  nibble; ``P.weight.absmax`` float32 per block of ``blocksize`` elements of the row-major ``[out, in]``
  weight (uint8 codes with double quantization, then ``P.weight.nested_absmax`` float32 per 256 of
  them and ``P.weight.nested_quant_map`` float32[256]); ``P.weight.quant_map`` float32[16];
  ``P.weight.quant_state.bitsandbytes__<type>`` a uint8 tensor holding UTF-8 JSON (quant_type,
  blocksize, dtype, shape, and nested_blocksize / nested_dtype / nested_offset).
  ``W.flatten()[j] = quant_map[q_j] · absmax[j // blocksize]``, with, when nested,
  ``absmax[i] = nested_quant_map[absmax_u8[i]] · nested_absmax[i // nested_blocksize] + nested_offset``.
* 8-bit: ``P.weight`` int8 ``[out, in]``, ``P.SCB`` float32 ``[out]`` (row absmax),
  ``P.weight_format`` 0 (row-major); ``W = CB · SCB / 127``.

The arithmetic is done in float32 in the same order as bitsandbytes' CPU kernels, so the result is
bit for bit theirs (tests/test_quant_bnb.py). :func:`quantize_4bit` is the inverse used to requantize a
merged weight (round to the nearest code, ties to the lower one, as bitsandbytes does).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError

NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4 = tuple(v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))
CODES = {"nf4": NF4, "fp4": FP4}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT8_SCALE = 7.874015718698502e-3
"""``1/127`` as bitsandbytes writes it (the product is taken in this order for bit-exact results)."""


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 code table of ``nf4`` or ``fp4``."""
    return torch.tensor(CODES[quant_type], dtype=torch.float32)


def _tensor(tensors: Mapping[str, torch.Tensor], key: str, name: str, dtype: torch.dtype) -> torch.Tensor:
    if name not in tensors:
        raise InputError(f"{key}.{name}: missing (the layer has {', '.join(sorted(tensors))})")
    value = tensors[name]
    if value.dtype != dtype:
        raise InputError(f"{key}.{name}: dtype {value.dtype}, expected {dtype}")
    return value


def quant_state(tensors: Mapping[str, torch.Tensor], key: str) -> dict[str, Any]:
    """The JSON of ``weight.quant_state.bitsandbytes__<type>``, checked against its own key."""
    names = [n for n in tensors if n.startswith("weight.quant_state.bitsandbytes__")]
    if len(names) != 1:
        raise InputError(f"{key}.weight.quant_state.bitsandbytes__*: expected one quant state, found {len(names)}")
    name = names[0]
    try:
        state = json.loads(bytes(tensors[name].to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{key}.{name}: not UTF-8 JSON ({e})") from e
    if not isinstance(state, dict):
        raise InputError(f"{key}.{name}: expected a JSON object")
    quant_type = state.get("quant_type")
    if quant_type not in CODES:
        raise InputError(f"{key}.{name}: unknown quant_type {quant_type!r} (bitsandbytes 4-bit is nf4 or fp4)")
    if name.rpartition("__")[2] != quant_type:
        raise InputError(f"{key}.{name}: the key names {name.rpartition('__')[2]!r}, the JSON {quant_type!r}")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise InputError(f"{key}.{name}: shape {shape!r} is not [out_features, in_features]")
    return state


def dequantize_4bit(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str) -> torch.Tensor:
    """The fp32 weight ``[out, in]`` of the bitsandbytes 4-bit layer ``key`` (NF4 or FP4, nested or not).

    Raises:
        InputError: a quant state that disagrees with the tensors or with ``config``, a blocksize that
            does not divide the weight, a packed tensor of the wrong length, a missing tensor.
    """
    state = quant_state(tensors, key)
    quant_type, (rows, cols) = state["quant_type"], state["shape"]
    expected = config.get("bnb_4bit_quant_type", quant_type)
    if expected != quant_type:
        raise InputError(
            f"{key}: quant_state says {quant_type!r}, quantization_config.bnb_4bit_quant_type {expected!r}"
        )
    blocksize = state.get("blocksize")
    count = rows * cols
    if blocksize not in BLOCKSIZES or count % blocksize:
        raise InputError(f"{key}: blocksize {blocksize!r} does not divide the {rows}×{cols} weight into blocks")
    packed = _tensor(tensors, key, "weight", torch.uint8)
    if packed.numel() * 2 != count:
        raise InputError(
            f"{key}.weight: {packed.numel()} packed bytes for a {rows}×{cols} weight (expected {count // 2})"
        )
    code = _tensor(tensors, key, "weight.quant_map", torch.float32)
    if code.numel() != 16:
        raise InputError(f"{key}.weight.quant_map: {code.numel()} entries, expected 16")
    absmax = _absmax(tensors, state, key, count // blocksize)
    return decode_4bit(packed, absmax, code, blocksize, rows, cols)


def _absmax(tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], key: str, blocks: int) -> torch.Tensor:
    nested = "weight.nested_absmax" in tensors
    absmax = _tensor(tensors, key, "weight.absmax", torch.uint8 if nested else torch.float32)
    if absmax.numel() != blocks:
        raise InputError(f"{key}.weight.absmax: {absmax.numel()} blocks, the quant state implies {blocks}")
    if not nested:
        return absmax.flatten()
    nested_blocksize = state.get("nested_blocksize")
    if not isinstance(nested_blocksize, int) or nested_blocksize < 1:
        raise InputError(f"{key}.weight.quant_state: nested_blocksize {nested_blocksize!r}")
    if state.get("nested_dtype", "float32") != "float32":
        raise UnsupportedError(f"{key}: nested_dtype {state.get('nested_dtype')!r} (peftc reads float32)")
    scales = _tensor(tensors, key, "weight.nested_absmax", torch.float32).flatten()
    code = _tensor(tensors, key, "weight.nested_quant_map", torch.float32).flatten()
    if scales.numel() != -(-blocks // nested_blocksize) or code.numel() != 256:
        raise InputError(
            f"{key}.weight.nested_absmax: {scales.numel()} scales and {code.numel()} codes for {blocks} blocks "
            f"of {nested_blocksize} (expected {-(-blocks // nested_blocksize)} and 256)"
        )
    offset = torch.tensor(float(state.get("nested_offset", 0.0)), dtype=torch.float32)
    return decode_nested(absmax.flatten(), scales, code, nested_blocksize) + offset


def decode_nested(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, blocksize: int) -> torch.Tensor:
    """8-bit blockwise dequantization: ``table[codes[i]] · scales[i // blocksize]`` (fp32)."""
    per_code = scales.repeat_interleave(blocksize)[: codes.numel()]
    return table[codes.long()] * per_code


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The int64 4-bit codes of uint8 ``packed``, the high nibble first."""
    flat = packed.flatten().long()
    return torch.stack([flat >> 4, flat & 0xF], dim=1).flatten()


def decode_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, rows: int, cols: int
) -> torch.Tensor:
    """``code[q] · absmax[block]`` over the unpacked codes, as a float32 ``[rows, cols]`` matrix."""
    values = code[unpack_nibbles(packed)].reshape(-1, blocksize)
    return (values * absmax.reshape(-1, 1)).reshape(rows, cols)


def quantize_4bit(weight: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of ``weight`` (row-major): ``(packed uint8 [n/2, 1], absmax float32)``.

    Each block is scaled by ``1/absmax`` into [-1, 1] and each value takes the nearest code (a value
    exactly between two codes takes the lower one).
    """
    table = code_table(quant_type)
    flat = weight.detach().to(torch.float32).reshape(-1, blocksize)
    absmax = flat.abs().amax(dim=1)
    scaled = (flat * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).flatten()
    order = torch.argsort(table)
    ranked = table[order]
    midpoints = (ranked[:-1] + ranked[1:]) / 2
    q = order[torch.searchsorted(midpoints, scaled, right=False)]
    return ((q[0::2] << 4) | q[1::2]).to(torch.uint8).unsqueeze(1), absmax


def dequantize_int8(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str) -> torch.Tensor:
    """The fp32 weight ``[out, in]`` of the LLM.int8 layer ``key``: ``CB · SCB / 127``.

    Raises:
        InputError: a missing or mis-shaped ``weight`` / ``SCB``.
        UnsupportedError: a weight format other than row-major (0), or fp16 weights kept for training.
    """
    if config.get("llm_int8_has_fp16_weight"):
        raise UnsupportedError(f"{key}: quantization_config.llm_int8_has_fp16_weight = true (weights are not int8)")
    weight = _tensor(tensors, key, "weight", torch.int8)
    scb = _tensor(tensors, key, "SCB", torch.float32)
    if weight.dim() != 2 or scb.numel() != weight.shape[0]:
        raise InputError(f"{key}.SCB: {scb.numel()} row scales for a weight of shape {list(weight.shape)}")
    layout = tensors.get("weight_format")
    if layout is not None and int(layout.flatten()[0]) != 0:
        raise UnsupportedError(f"{key}.weight_format = {int(layout.flatten()[0])} (peftc reads 0, row-major)")
    return weight * scb.view(-1, 1) * INT8_SCALE
