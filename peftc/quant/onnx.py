"""ONNX translations of the quantized-linear ops (``peftc/quant/ops.py``) for ``torch.onnx.export``.

``MatMulBnb4`` (domain ``com.microsoft``, onnxruntime CPU): attributes ``K`` (in), ``N`` (out),
``block_size``, ``quant_type`` (0 FP4, 1 NF4); inputs ``A`` (fp32/fp16), ``B`` the uint8 packing of the
row-major ``[N, K]`` weight (high nibble first, exactly bitsandbytes' bytes), ``absmax`` one scale per
block, in ``A``'s dtype. Its code tables are bitsandbytes' own (the loader refuses a checkpoint whose
``quant_map`` differs).
"""

from __future__ import annotations

from typing import Any

import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from peftc.backends.onnx.script import cast, scalar
from peftc.quant.bnb import INT8_SCALE

MSFT = onnxscript.values.Opset("com.microsoft", 1)
_FLOATS = ["tensor(float)", "tensor(float16)"]
MATMUL_BNB4 = onnxscript.values.Op(
    MSFT,
    "MatMulBnb4",
    OpSchema(
        "MatMulBnb4", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("absmax", "T1")],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", _FLOATS, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("K", "N", "block_size", "quant_type")],
    ),
)  # fmt: skip
"""onnxruntime's contrib op, described here (onnx has no schema for it)."""


def bnb4_linear(
    x: Any,
    packed: Any,
    absmax: Any,
    code: Any,
    bias: Any,
    blocksize: int,
    quant_type: int,
    out_features: int,
    in_features: int,
) -> Any:
    """``MatMulBnb4(x, packed, absmax) + b``."""
    return _matmul_bnb4(x, packed, cast(absmax, absmax, x), bias, blocksize, quant_type, out_features, in_features)


def _matmul_bnb4(x, packed, absmax, bias, blocksize: int, quant_type: int, out_features: int, in_features: int):
    flat = op.Reshape(packed, op.Constant(value_ints=[-1]))
    y = MATMUL_BNB4(x, flat, absmax, K=in_features, N=out_features, block_size=blocksize, quant_type=quant_type)
    return y if bias is None else op.Add(y, cast(bias, bias, x))


def bnb4dq_linear(
    x: Any, packed: Any, absmax_codes: Any, nested_absmax: Any, nested_code: Any, code: Any, bias: Any,
    blocksize: int, quant_type: int, nested_blocksize: int, nested_offset: float, out_features: int, in_features: int,
) -> Any:  # fmt: skip
    """The absmax decoded in the graph (``nested_code[codes] · nested_absmax[block] + offset``, fp32, each step
    rounded once as bitsandbytes does), then :func:`bnb4_linear`."""
    blocks = out_features * in_features // blocksize
    pad = -blocks % nested_blocksize
    values = op.Gather(nested_code, op.Cast(absmax_codes, to=6), axis=0)  # int32 indices
    if pad:
        values = op.Pad(values, op.Constant(value_ints=[0, pad]))
    rows = op.Reshape(values, op.Constant(value_ints=[-1, nested_blocksize]))
    scaled = op.Mul(rows, op.Unsqueeze(nested_absmax, op.Constant(value_ints=[1])))
    scaled = op.Reshape(scaled, op.Constant(value_ints=[-1]))
    if pad:
        scaled = op.Slice(scaled, op.Constant(value_ints=[0]), op.Constant(value_ints=[blocks]))
    absmax = cast(op.Add(scaled, op.Constant(value_float=nested_offset)), nested_absmax, x)
    return _matmul_bnb4(x, packed, absmax, bias, blocksize, quant_type, out_features, in_features)


_NBITS_CONSTANTS = ("K", "N", "bits", "block_size", "accuracy_level")
MATMUL_NBITS = onnxscript.values.Op(
    MSFT,
    "MatMulNBits",
    OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("scales", "T1"), OpSchema.FormalParameter("zero_points", "T2")],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", _FLOATS, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in _NBITS_CONSTANTS],
    ),
)  # fmt: skip
"""onnxruntime's contrib op with the inputs ``peftc::blocks_linear`` gives it (``peftc/quant/matmulnbits.py``)."""


def blocks_linear(
    x: Any, packed: Any, scales: Any, zero_points: Any, bias: Any, bits: int, block_size: int, accuracy_level: int,
    out_features: int, in_features: int,
) -> Any:  # fmt: skip
    """``MatMulNBits(x, packed, scales, zero_points) + b``: the tensors are already in its layout."""
    y = MATMUL_NBITS(
        x, packed, cast(scales, scales, x), zero_points, K=in_features, N=out_features, bits=bits,
        block_size=block_size, accuracy_level=accuracy_level,
    )  # fmt: skip
    return y if bias is None else op.Add(y, cast(bias, bias, x))


def int8_linear(x: Any, weight: Any, scb: Any, bias: Any) -> Any:
    """``x · (CB · SCB / 127)ᵀ + b``, dequantized in the graph (folded by onnxruntime at load time)."""
    dense = op.Mul(
        op.Mul(op.Cast(weight, to=1), op.Unsqueeze(scb, op.Constant(value_ints=[1]))), scalar(INT8_SCALE, scb)
    )
    y = op.MatMul(x, cast(op.Transpose(dense, perm=[1, 0]), dense, x))
    return y if bias is None else op.Add(y, cast(bias, bias, x))


PENDING = onnxscript.values.Opset("peftc.pending", 1)
_NBITS_ATTRS = ("fmt", "bits", "version", "group_size", "N", "K")
NBITS_PENDING = onnxscript.values.Op(
    PENDING,
    "NBitsLinear",
    OpSchema(
        "NBitsLinear", "peftc.pending", 1,
        inputs=[OpSchema.FormalParameter(n, t) for n, t in
                (("A", "T1"), ("qweight", "T2"), ("qzeros", "T2"), ("scales", "T3"), ("g_idx", "T4"))],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", _FLOATS, ""), ("T2", ["tensor(int32)"], ""),
                          ("T3", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T4", ["tensor(int64)", "tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in _NBITS_ATTRS],
    ),
)  # fmt: skip
"""A placeholder for ``peftc::nbits_linear`` while the model is exported: the translation cannot read the
packed initializers (the exporter fills them in afterwards), so :func:`repack_nbits` replaces each one by
``com.microsoft.MatMulNBits`` with the checkpoint's codes repacked (``peftc/quant/matmulnbits.py``)."""


def nbits_linear(
    x: Any, qweight: Any, qzeros: Any, scales: Any, g_idx: Any, bias: Any, fmt: int, bits: int, version: int,
    group_size: int, out_features: int, in_features: int,
) -> Any:  # fmt: skip
    """``NBitsLinear(x, qweight, qzeros, scales, g_idx) + b`` (see :data:`NBITS_PENDING`)."""
    y = NBITS_PENDING(
        x, qweight, qzeros, scales, g_idx, fmt=fmt, bits=bits, version=version, group_size=group_size,
        N=out_features, K=in_features,
    )  # fmt: skip
    return y if bias is None else op.Add(y, cast(bias, bias, x))


def repack_nbits(model: Any) -> int:
    """Replace every pending ``NBitsLinear`` of the exported ``model`` (onnx_ir) by ``com.microsoft.MatMulNBits``
    on the codes repacked from its initializers; return how many.

    Raises:
        UnsupportedError: a layer MatMulNBits cannot hold code for code (GPTQ act-order, 3-bit codes, a group
            size that is not a power of two ≥ 16), naming the initializer.
    """
    import onnx_ir

    from peftc.quant import matmulnbits
    from peftc.quant.ops import FORMATS

    done = 0
    for node in list(model.graph):
        if node.domain != "peftc.pending":
            continue
        x, *packed = node.inputs
        attrs = {n: node.attributes[n].value for n in _NBITS_ATTRS}
        key = packed[0].name.removesuffix("qweight").rstrip(".") or "the model"  # the layer's module path
        tensors = dict(zip(("qweight", "qzeros", "scales", "g_idx"), (_array(v) for v in packed), strict=True))
        fmt = FORMATS[attrs["fmt"]]
        config = {"quant_method": fmt, "bits": attrs["bits"], "group_size": attrs["group_size"]}
        if fmt == "gptq":
            config["checkpoint_format"] = "gptq" if attrs["version"] == 1 else "gptq_v2"
            blocks = matmulnbits.from_gptq(tensors, config, key)
        else:
            del tensors["g_idx"]
            blocks = matmulnbits.from_awq(tensors, config, key)
        inputs = [x]
        dtype = x.dtype.numpy() if x.dtype is not None else "float32"
        for suffix, value in (("B", blocks.packed), ("scales", blocks.scales.numpy().astype(dtype)),
                              ("zero_points", blocks.zero_points)):  # fmt: skip
            if value is not None:
                tensor = onnx_ir.tensor(
                    value if not hasattr(value, "numpy") else value.numpy(), name=f"{key}.nbits.{suffix}"
                )
                initializer = onnx_ir.Value(name=tensor.name, const_value=tensor)
                initializer.shape, initializer.dtype = tensor.shape, tensor.dtype
                model.graph.register_initializer(initializer)
                inputs.append(initializer)
        attributes = [onnx_ir.AttrInt64(k, v) for k, v in blocks.attributes().items()]
        made = onnx_ir.Node("com.microsoft", "MatMulNBits", inputs, attributes=attributes, name=node.name)
        model.graph.insert_before(node, made)
        onnx_ir.convenience.replace_all_uses_with(node.outputs[0], made.outputs[0], replace_graph_outputs=True)
        made.outputs[0].name, made.outputs[0].shape, made.outputs[0].dtype = (
            node.outputs[0].name, node.outputs[0].shape, node.outputs[0].dtype,
        )  # fmt: skip
        model.graph.remove(node, safe=True)
        for value in packed:
            if not value.uses():
                model.graph.initializers.pop(value.name, None)
        done += 1
    if done:
        model.opset_imports.setdefault("com.microsoft", 1)
    return done


def _array(value: Any) -> Any:
    import torch

    if value.const_value is None:
        raise AssertionError(f"{value.name}: a packed GPTQ/AWQ tensor that is not an initializer")
    return torch.from_numpy(value.const_value.numpy().copy())


def _lora_branch(y: Any, x: Any, lora_a: Any, lora_b: Any, scale: float) -> Any:
    """``y + s·(x Aᵀ) Bᵀ`` (the scaled, transposed factors are folded by onnxruntime at load time)."""
    a_t = op.Transpose(cast(lora_a, lora_a, x), perm=[1, 0])
    b_t = op.Transpose(op.Mul(cast(lora_b, lora_b, x), scalar(scale, x)), perm=[1, 0])
    return op.Add(y, op.MatMul(op.MatMul(x, a_t), b_t))


def lora_bnb4(
    x: Any, packed: Any, absmax: Any, code: Any, bias: Any, lora_a: Any, lora_b: Any, scale: float, blocksize: int,
    quant_type: int, out_features: int, in_features: int,
) -> Any:  # fmt: skip
    """``peftc::lora_bnb4``: MatMulBnb4 plus the LoRA branch (the two-path merge policy)."""
    y = bnb4_linear(x, packed, absmax, code, bias, blocksize, quant_type, out_features, in_features)
    return _lora_branch(y, x, lora_a, lora_b, scale)


def lora_bnb4dq(
    x: Any, packed: Any, absmax_codes: Any, nested_absmax: Any, nested_code: Any, code: Any, bias: Any, lora_a: Any,
    lora_b: Any, scale: float, blocksize: int, quant_type: int, nested_blocksize: int, nested_offset: float,
    out_features: int, in_features: int,
) -> Any:  # fmt: skip
    """``peftc::lora_bnb4dq``: the in-graph absmax decode, MatMulBnb4 and the LoRA branch."""
    y = bnb4dq_linear(
        x, packed, absmax_codes, nested_absmax, nested_code, code, bias, blocksize, quant_type, nested_blocksize,
        nested_offset, out_features, in_features,
    )  # fmt: skip
    return _lora_branch(y, x, lora_a, lora_b, scale)


def lora_int8(x: Any, weight: Any, scb: Any, bias: Any, lora_a: Any, lora_b: Any, scale: float) -> Any:
    """``peftc::lora_int8``: the int8 layer plus the LoRA branch."""
    return _lora_branch(int8_linear(x, weight, scb, bias), x, lora_a, lora_b, scale)


def lora_nbits(
    x: Any, qweight: Any, qzeros: Any, scales: Any, g_idx: Any, bias: Any, lora_a: Any, lora_b: Any, scale: float,
    fmt: int, bits: int, version: int, group_size: int, out_features: int, in_features: int,
) -> Any:  # fmt: skip
    """``peftc::lora_nbits``: MatMulNBits (repacked after export) plus the LoRA branch."""
    y = nbits_linear(x, qweight, qzeros, scales, g_idx, bias, fmt, bits, version, group_size, out_features, in_features)
    if getattr(y, "dtype", x.dtype) is None:  # the pending op's output: typed here, it is no graph output
        y.dtype = x.dtype
    return _lora_branch(y, x, lora_a, lora_b, scale)


def int8_embedding(ids: Any, codes: Any, scales: Any) -> Any:
    """``Gather`` of the int8 rows and of their scales, dequantized per call (only the rows looked up)."""
    rows = op.Cast(op.Gather(codes, ids, axis=0), to=1)
    scale = op.Unsqueeze(
        op.Mul(op.Gather(scales, ids, axis=0), scalar(INT8_SCALE, scales)), op.Constant(value_ints=[-1])
    )
    return op.Mul(rows, scale)


def fp16_embedding(ids: Any, table: Any) -> Any:
    """``Gather`` of the fp16 rows, cast to fp32 (only the rows looked up)."""
    return op.Cast(op.Gather(table, ids, axis=0), to=1)
