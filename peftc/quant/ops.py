"""The ``peftc::`` ops of quantized linear layers: the packed weight stays packed in the IR.

* ``peftc::bnb4_linear(x, packed, absmax, code, bias, blocksize, quant_type, out_features, in_features)``
  — a bitsandbytes 4-bit layer: ``x · dequant(packed)ᵀ + b`` (``absmax`` already fp32: a nested
  absmax is decoded when the checkpoint is read). ONNX: ``com.microsoft.MatMulBnb4`` (onnxruntime's
  CPU kernel; its ``B`` is bitsandbytes' own packing of the ``[N, K]`` weight, high nibble first).
* ``peftc::bnb4dq_linear(x, packed, absmax_codes, nested_absmax, nested_code, code, bias, blocksize, quant_type,
  nested_blocksize, nested_offset, out_features, in_features)`` — the same layer with bitsandbytes' double
  quantization kept: uint8 ``absmax_codes``, one fp32 ``nested_absmax`` per ``nested_blocksize`` of them, the
  256-entry ``nested_code`` and the ``nested_offset``; ``absmax = nested_code[codes] · nested_absmax + offset``
  (:func:`peftc.quant.bnb.decode_nested`). ONNX: that decode in the graph (Gather, Mul, Add), then MatMulBnb4.
* ``peftc::int8_linear(x, weight, scb, bias)`` — an LLM.int8 layer: ``x · (CB · SCB / 127)ᵀ + b``.
  ONNX: dequantized in the graph (Cast, Mul, MatMul).
* ``peftc::nbits_linear(x, qweight, qzeros, scales, g_idx, bias, fmt, bits, version, group_size, out_features,
  in_features)`` — a GPTQ (``fmt`` 0, ``version`` 1 or 2) or AWQ GEMM (``fmt`` 1) layer, tensors exactly as
  the checkpoint stores them (``g_idx``: the group of every input row). ONNX: ``com.microsoft.MatMulNBits``,
  repacked code for code when the model is exported (``peftc/quant/onnx.py``).
* ``peftc::blocks_linear(x, packed, scales, zero_points, bias, bits, block_size, accuracy_level, out_features,
  in_features)`` — a weight requantized into MatMulNBits' own blocks (the ``requant-int8`` merge policy).
  ONNX: ``com.microsoft.MatMulNBits`` on these tensors as they are.

Both are opaque call ops whose eager bodies are the reference math of ``peftc/quant/bnb.py``;
AOTInductor decomposes them into those bodies (dequantize-in-graph on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftc.ops import call_op
from peftc.quant import awq, bnb, gptq, matmulnbits

QUANT_TYPES = ("fp4", "nf4")
"""``quant_type`` integers as MatMulBnb4 numbers them (0 FP4, 1 NF4)."""


def bnb4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    bias: torch.Tensor | None,
    blocksize: int,
    quant_type: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """A linear layer on a bitsandbytes 4-bit weight (dequantized in fp32, multiplied in ``x``'s dtype)."""
    weight = bnb.decode_4bit(packed, absmax, code, blocksize, out_features, in_features)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _bnb4_fake(x, packed, absmax, code, bias, blocksize, quant_type, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


def bnb4dq_linear(
    x: torch.Tensor, packed: torch.Tensor, absmax_codes: torch.Tensor, nested_absmax: torch.Tensor,
    nested_code: torch.Tensor, code: torch.Tensor, bias: torch.Tensor | None, blocksize: int, quant_type: int,
    nested_blocksize: int, nested_offset: float, out_features: int, in_features: int,
) -> torch.Tensor:  # fmt: skip
    """:func:`bnb4_linear` on the absmax decoded from its double quantization (fp32, bitsandbytes' order)."""
    absmax = nested_absmax_of(absmax_codes, nested_absmax, nested_code, nested_blocksize, nested_offset)
    return bnb4_linear(x, packed, absmax, code, bias, blocksize, quant_type, out_features, in_features)


def nested_absmax_of(codes, nested_absmax, nested_code, nested_blocksize: int, nested_offset: float) -> torch.Tensor:
    """The fp32 absmax of a double-quantized layer: ``nested_code[codes] · nested_absmax[i // blocksize] + offset``."""
    return bnb.decode_nested(codes, nested_absmax, nested_code, nested_blocksize) + nested_offset  # added in fp32


def _bnb4dq_fake(x, packed, codes, nested_absmax, nested_code, code, bias, *scalars):
    return x.new_empty((*x.shape[:-1], scalars[-2]))


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear layer on an LLM.int8 weight (``CB · SCB / 127`` in fp32)."""
    dense = weight * scb.view(-1, 1) * bnb.INT8_SCALE
    return F.linear(x, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _int8_fake(x, weight, scb, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


FORMATS = ("gptq", "awq")
"""``fmt`` integers of ``peftc::nbits_linear``."""


def nbits_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: int,
    bits: int,
    version: int,
    group_size: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """A linear layer on a GPTQ / AWQ weight: the decoders' formula in fp32, multiplied in ``x``'s dtype."""
    weight = nbits_weight(qweight, qzeros, scales, g_idx, fmt, bits, version)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def nbits_weight(qweight, qzeros, scales, g_idx, fmt: int, bits: int, version: int) -> torch.Tensor:
    """The fp32 weight ``[out, in]`` of ``peftc::nbits_linear``'s tensors (``fmt``: index in :data:`FORMATS`)."""
    if FORMATS[fmt] == "gptq":
        return gptq.decode(qweight, qzeros, scales, g_idx, bits, version)
    return awq.decode(qweight, qzeros, scales, g_idx)


def _nbits_fake(x, qweight, qzeros, scales, g_idx, bias, fmt, bits, version, group_size, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


BNB4_LINEAR = call_op(
    "bnb4_linear",
    bnb4_linear,
    _bnb4_fake,
    tensor_roles=("packed", "absmax", "code"),
    scalars=("blocksize", "quant_type", "out_features", "in_features"),
    base_params=("bias",),
    onnx="peftc.quant.onnx:bnb4_linear",
)
BNB4DQ_LINEAR = call_op(
    "bnb4dq_linear",
    bnb4dq_linear,
    _bnb4dq_fake,
    tensor_roles=("packed", "absmax_codes", "nested_absmax", "nested_code", "code"),
    scalars=("blocksize", "quant_type", "nested_blocksize", "nested_offset", "out_features", "in_features"),
    base_params=("bias",),
    onnx="peftc.quant.onnx:bnb4dq_linear",
)
INT8_LINEAR = call_op(
    "int8_linear",
    int8_linear,
    _int8_fake,
    tensor_roles=("weight", "scb"),
    scalars=(),
    base_params=("bias",),
    onnx="peftc.quant.onnx:int8_linear",
)
NBITS_LINEAR = call_op(
    "nbits_linear",
    nbits_linear,
    _nbits_fake,
    tensor_roles=("qweight", "qzeros", "scales", "g_idx"),
    scalars=("fmt", "bits", "version", "group_size", "out_features", "in_features"),
    base_params=("bias",),
    onnx="peftc.quant.onnx:nbits_linear",
)


def blocks_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block_size: int,
    accuracy_level: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """A linear layer on a weight in MatMulNBits blocks (``peftc/quant/matmulnbits.py``), computed as onnxruntime's
    CPU kernel does: accuracy level 4 rounds ``x`` to int8 per block first, then an fp32 product."""
    weight = matmulnbits.decode(packed, scales, zero_points, bits, block_size, in_features)
    if accuracy_level == matmulnbits.INT8_ACTIVATIONS:
        x = matmulnbits.round_activations(x, block_size).to(x.dtype)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _blocks_fake(x, packed, scales, zero_points, bias, bits, block_size, accuracy_level, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


BLOCKS_LINEAR = call_op(
    "blocks_linear",
    blocks_linear,
    _blocks_fake,
    tensor_roles=("packed", "scales", "zero_points"),
    scalars=("bits", "block_size", "accuracy_level", "out_features", "in_features"),
    base_params=("bias",),
    onnx="peftc.quant.onnx:blocks_linear",
)
"""A site the ``requant-int8`` merge policy requantized (``peftc/quant/policy.py``); ONNX: ``MatMulNBits``."""
OPS = (BNB4_LINEAR, BNB4DQ_LINEAR, INT8_LINEAR, NBITS_LINEAR, BLOCKS_LINEAR)


def quant_type_number(name: str) -> int:
    """MatMulBnb4's ``quant_type`` for ``"fp4"`` / ``"nf4"``."""
    return QUANT_TYPES.index(name)


def int8_embedding(ids: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an int8 table with one fp32 scale per row: ``codes[ids] · scales[ids] / 127``."""
    return codes[ids].to(torch.float32) * (scales[ids] * bnb.INT8_SCALE).unsqueeze(-1)


def _int8_embedding_fake(ids, codes, scales):
    return scales.new_empty((*ids.shape, codes.shape[1]))


INT8_EMBEDDING = call_op(
    "int8_embedding",
    int8_embedding,
    _int8_embedding_fake,
    tensor_roles=("codes", "scales"),
    scalars=(),
    onnx="peftc.quant.onnx:int8_embedding",
)
"""An embedding table stored int8 (``--quantize-embeddings``, ``peftc/quant/embeddings.py``)."""


def fp16_embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an fp16 table, in fp32."""
    return table[ids].to(torch.float32)


def _fp16_embedding_fake(ids, table):
    return table.new_empty((*ids.shape, table.shape[1]), dtype=torch.float32)


FP16_EMBEDDING = call_op(
    "fp16_embedding",
    fp16_embedding,
    _fp16_embedding_fake,
    tensor_roles=("table",),
    scalars=(),
    onnx="peftc.quant.onnx:fp16_embedding",
)
"""An embedding table stored fp16 (``--quantize-embeddings int8-head``: the head int8, the embedding fp16)."""
OPS = (*OPS, INT8_EMBEDDING, FP16_EMBEDDING)
