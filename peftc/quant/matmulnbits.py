"""Block-quantized weights in onnxruntime's ``com.microsoft.MatMulNBits`` layout, and the symmetric int4
blocks TensorRT's ``DequantizeLinear`` accepts.

``Y = A · dequant(B)ᵀ`` for a weight ``[N, K]`` cut along K into blocks of ``block_size``
(``../shared/FORMATS.md`` §4):

* ``B`` uint8 ``[N, k_blocks, block_size·bits/8]``: codes along K, the first code in the LOW bits of a byte;
* ``scales`` ``[N, k_blocks]`` in A's dtype;
* ``zero_points`` uint8 ``[N, ceil(k_blocks·bits/8)]``, packed the same way along the blocks of a row
  (absent: the mid-range ``2^(bits−1)``);
* ``W[n, k] = scales[n, k // bs] · (code[n, k] − zero[n, k // bs])``.

GPTQ (without act-order) and AWQ GEMM repack into it code for code, so the ONNX operator computes with
exactly the checkpoint's weight. TensorRT's int4 ``DequantizeLinear`` needs zero points of 0:
:func:`symmetric` requantizes, and :func:`requant_error` says what that costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import UnsupportedError
from peftc.quant import awq, gptq, intpack

DOMAIN = "com.microsoft"
BITS = (2, 4, 8)
"""What onnxruntime's CPU kernel runs."""


@dataclasses.dataclass(frozen=True)
class Blocks:
    """One weight ``[n, k]`` as MatMulNBits stores it."""

    bits: int
    block_size: int
    k: int
    n: int
    packed: torch.Tensor
    """uint8 ``[n, k_blocks, block_size·bits/8]``."""
    scales: torch.Tensor
    """float32 ``[n, k_blocks]``."""
    zero_points: torch.Tensor | None
    """uint8 ``[n, ceil(k_blocks·bits/8)]``; None for the mid-range zero."""

    @property
    def k_blocks(self) -> int:
        """Blocks per output row."""
        return math.ceil(self.k / self.block_size)

    def attributes(self) -> dict[str, int]:
        """The node's attributes (``accuracy_level`` 0: onnxruntime's default, fp32 compute on CPU)."""
        return {"K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size, "accuracy_level": 0}


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes of integer ``codes [..., m]`` along the last dim, low bits first (m padded with zeros)."""
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte) * bits
    return (codes << shifts).sum(-1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int64 codes of uint8 ``packed [..., bytes]``, the first ``count`` along the last dim."""
    shifts = torch.arange(8 // bits) * bits
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def from_codes(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int) -> Blocks:
    """Pack ``codes [N, K]`` with per-block ``zeros`` and ``scales [N, k_blocks]``."""
    n, k = codes.shape
    blocks = math.ceil(k / block_size)
    padded = torch.nn.functional.pad(codes, (0, blocks * block_size - k)).reshape(n, blocks, block_size)
    mid = 1 << (bits - 1)
    zero_points = None if bool((zeros == mid).all()) else pack_rows(zeros, bits)
    return Blocks(bits, block_size, k, n, pack_rows(padded, bits), scales.to(torch.float32), zero_points)


def dequantize(blocks: Blocks) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` the operator computes with."""
    return decode(blocks.packed, blocks.scales, blocks.zero_points, blocks.bits, blocks.block_size, blocks.k)


def decode(
    packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int, block_size: int, k: int
) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` of MatMulNBits' tensors: ``scales[n, k // bs] · (code[n, k] − zero[n, k // bs])``."""
    n, k_blocks = scales.shape
    codes = unpack_rows(packed, bits, block_size).reshape(n, -1)[:, :k]
    if zero_points is None:
        zeros = torch.full((n, k_blocks), 1 << (bits - 1), dtype=torch.int64)
    else:
        zeros = unpack_rows(zero_points, bits, k_blocks)
    group = torch.arange(k) // block_size
    return scales.to(torch.float32)[:, group] * (codes - zeros[:, group]).to(torch.float32)


INT8_ACTIVATIONS = 4
"""``accuracy_level`` 4: the CPU kernel rounds ``A`` to int8 per block of ``block_size`` along K (one
scale ``absmax / 127`` a block, round to nearest) and multiplies integers (VNNI where the CPU has it)."""


def round_activations(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` as accuracy level 4 rounds it: symmetric int8 per block of ``block_size`` along the last dim,
    dequantized back to fp32 (the kernel's integer products times both scales are these values' products)."""
    k = x.shape[-1]
    pad = (-k) % block_size
    blocks = torch.nn.functional.pad(x.to(torch.float32), (0, pad)).reshape(*x.shape[:-1], -1, block_size)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    codes = torch.round(blocks / torch.where(scale > 0, scale, 1.0))
    return (codes * scale).reshape(*x.shape[:-1], -1)[..., :k]


def output_error(blocks: Blocks, weight: torch.Tensor, accuracy_level: int, rows: int = 256) -> float:
    """``‖Q(x)·Ŵᵀ − x·Wᵀ‖_F / ‖x·Wᵀ‖_F`` for isotropic ``x ~ N(0, I)`` (``rows`` of them, seed 0): the relative
    RMS error the blocks add to a linear layer's output, with the activations' rounding ``Q`` of accuracy
    level 4 (level 0: ``Q(x) = x``, which is ``‖Ŵ − W‖_F / ‖W‖_F`` up to sampling)."""
    x = torch.randn(rows, blocks.k, generator=torch.Generator().manual_seed(0))
    rounded = round_activations(x, blocks.block_size) if accuracy_level == INT8_ACTIVATIONS else x
    exact = x @ weight.to(torch.float32).t()
    return float(
        torch.linalg.norm(rounded @ dequantize(blocks).t() - exact) / torch.linalg.norm(exact).clamp(min=1e-30)
    )


def quantize(weight: torch.Tensor, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> Blocks:
    """Round-to-nearest block quantization of an fp32 ``weight [N, K]`` (min/max per block; symmetric:
    ``scale = absmax / (2^(bits−1) − 1)`` around the mid-range zero)."""
    _check_layout(bits, block_size, "quantize")
    n, k = weight.shape
    blocks = math.ceil(k / block_size)
    w = torch.nn.functional.pad(weight.to(torch.float32), (0, blocks * block_size - k)).reshape(n, blocks, block_size)
    top = (1 << bits) - 1
    if symmetric:
        scales = w.abs().amax(-1) / ((1 << (bits - 1)) - 1)
        zeros = torch.full((n, blocks), 1 << (bits - 1), dtype=torch.int64)
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = (high - low) / top
        zeros = torch.where(scales > 0, (-low / scales.clamp(min=1e-30)).round(), 0).to(torch.int64).clamp(0, top)
    safe = torch.where(scales > 0, scales, 1.0)
    codes = (w / safe.unsqueeze(-1)).round().to(torch.int64) + zeros.unsqueeze(-1)
    codes = codes.clamp(0, top).reshape(n, -1)[:, :k]
    return from_codes(codes, zeros, scales, bits, block_size)


def symmetric(weight: torch.Tensor, block_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT's int4 weight: signed codes ``[N, K]`` in ``[-7, 7]`` (int8 holding int4) and scales
    ``[N, k_blocks]`` with ``W ≈ scales[:, k // bs] · codes`` — zero points 0, as its parser requires."""
    blocks = quantize(weight, 4, block_size, symmetric=True)
    return codes_of(blocks) - 8, blocks.scales


def codes_of(blocks: Blocks) -> torch.Tensor:
    """The unsigned codes ``[N, K]`` of ``blocks``."""
    return unpack_rows(blocks.packed, blocks.bits, blocks.block_size).reshape(blocks.n, -1)[:, : blocks.k]


def requant_error(weight: torch.Tensor, block_size: int = 32) -> dict[str, float]:
    """What requantizing ``weight`` symmetrically (for TensorRT) changes: max and relative Frobenius error."""
    codes, scales = symmetric(weight, block_size)
    group = torch.arange(weight.shape[1]) // block_size
    again = scales[:, group] * codes.to(torch.float32)
    diff = again - weight
    return {"max_abs": float(diff.abs().max()), "rel_fro": float(diff.norm() / weight.norm())}


def from_gptq(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str) -> Blocks:
    """A GPTQ layer repacked code for code (its groups become the blocks).

    Raises:
        UnsupportedError: act-order (``g_idx`` not ``i // group_size``: blocks are contiguous in K),
            3-bit codes, a group size that is not a power of two ≥ 16, a v1 zero of ``2^bits``.
    """
    k = gptq.dequantize(tensors, config, key).shape[1]  # validates every tensor and field
    bits = config["bits"]
    size = intpack.group_size(config, key, k)
    _check_layout(bits, size, key)
    if "g_idx" in tensors and not torch.equal(tensors["g_idx"].to(torch.int64), torch.arange(k) // size):
        raise UnsupportedError(
            f"{key}.g_idx: act-order groups are not contiguous in K, which MatMulNBits needs; requantize "
            "(matmulnbits.quantize) or dequantize this layer"
        )
    codes = intpack.unpack_codes(tensors["qweight"], bits, 0).t()
    version = gptq.checkpoint_version(config, key)
    zeros = intpack.unpack_codes(tensors["qzeros"], bits, 1).t() + (1 if version == 1 else 0)
    if int(zeros.max()) >= 1 << bits:
        raise UnsupportedError(f"{key}.qzeros: a v1 zero of {1 << bits} (stored -1) does not fit {bits} bits")
    return from_codes(codes, zeros, tensors["scales"].to(torch.float32).t(), bits, size)


def from_awq(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str) -> Blocks:
    """An AWQ GEMM layer repacked code for code (its groups become the blocks).

    Raises:
        UnsupportedError: a group size that is not a power of two ≥ 16.
    """
    k = awq.dequantize(tensors, config, key).shape[1]  # validates every tensor and field
    size = intpack.group_size(config, key, k)
    _check_layout(4, size, key)
    codes = awq.unpack_columns(tensors["qweight"]).t()
    zeros = awq.unpack_columns(tensors["qzeros"]).t()
    return from_codes(codes, zeros, tensors["scales"].to(torch.float32).t(), 4, size)


def node(blocks: Blocks, a: str, y: str, name: str) -> tuple[Any, list[Any]]:
    """The ``com.microsoft.MatMulNBits`` node ``y = a · Wᵀ`` and its initializers (``name``-prefixed)."""
    from onnx import helper, numpy_helper

    inputs = {f"{name}.B": blocks.packed, f"{name}.scales": blocks.scales}
    if blocks.zero_points is not None:
        inputs[f"{name}.zero_points"] = blocks.zero_points
    initializers = [numpy_helper.from_array(t.contiguous().numpy(), n) for n, t in inputs.items()]
    made = helper.make_node("MatMulNBits", [a, *inputs], [y], name=name, domain=DOMAIN, **blocks.attributes())
    return made, initializers


def dequantize_linear(codes: torch.Tensor, scales: torch.Tensor, block_size: int, name: str) -> tuple[Any, list[Any]]:
    """The opset-21 ``DequantizeLinear`` node ``name`` giving ``Wᵀ [K, N]`` (fp32) from :func:`symmetric`'s
    signed ``codes [N, K]`` and ``scales [N, k_blocks]``: int4 blocks along K (``axis=0``), no zero point,
    low nibble first — what TensorRT's int4 weight-only path parses. Feed its output to ``MatMul(A, ·)``.
    """
    from onnx import TensorProto, helper, numpy_helper

    n, k = codes.shape
    data = helper.make_tensor(f"{name}.q", TensorProto.INT4, [k, n], codes.t().flatten().tolist())
    scale = numpy_helper.from_array(scales.t().contiguous().to(torch.float32).numpy(), f"{name}.scales")
    made = helper.make_node("DequantizeLinear", [data.name, scale.name], [name], axis=0, block_size=block_size)
    return made, [data, scale]


def _check_layout(bits: int, block_size: int, key: str) -> None:
    if bits not in BITS:
        raise UnsupportedError(f"{key}: {bits}-bit codes; onnxruntime's MatMulNBits CPU kernel runs 2, 4 and 8 bits")
    if block_size < 16 or block_size & (block_size - 1):
        raise UnsupportedError(
            f"{key}: group_size {block_size}; MatMulNBits blocks are powers of two ≥ 16 (requantize this layer)"
        )
