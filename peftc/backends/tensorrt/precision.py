"""A reduced-precision copy of an ONNX model, for TensorRT's strongly typed networks.

TensorRT 11 and TensorRT-RTX removed the FP16/BF16 builder flags: a layer runs in the dtype the ONNX
gives it. So ``--precision fp16|bf16`` casts the model itself, keeping what peftc relies on:

1. every fp32 initializer becomes fp16/bf16 **under the same name** (the refit map still holds),
   clamped to the type's finite range (an additive mask of ``finfo(float32).min`` stays finite);
2. fp32 ``Constant``/``ConstantOfShape`` values and ``Cast(to=float)`` targets follow;
3. ``LayerNormalization`` keeps computing in fp32 (inputs cast up, output cast down), as PyTorch
   autocast does and as TensorRT advises, because its variance overflows fp16 on large activations;
4. inputs and outputs stay fp32 (a ``Cast`` after each float input and before each float output), so
   callers feed and read the same arrays as at fp32.

Control flow subgraphs are refused rather than half converted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from peftc.errors import UnsupportedError

KEEP_FP32 = frozenset({"LayerNormalization"})


def cast_model(path: Path, precision: str) -> Path:
    """Write ``model.<precision>.onnx`` beside ``path`` and return its path (see the module docstring)."""
    import onnx_ir as ir

    model = ir.load(str(path))
    cast_graph(model.graph, precision)
    out = path.with_name(f"{path.stem}.{precision}.onnx")
    external = any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values() if v.const_value
    )
    ir.save(model, str(out), external_data=f"{out.name}.data" if external else None)
    return out


def cast_graph(graph: Any, precision: str) -> None:
    """Cast ``graph`` (an ``onnx_ir.Graph``) in place."""
    import onnx_ir as ir

    low = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}[precision]
    low_np = low.numpy()
    fp32 = ir.DataType.FLOAT

    def convert(tensor: Any) -> Any:
        array = np.asarray(tensor.numpy(), dtype=np.float32)
        limit = float(np.finfo(np.float16).max) if precision == "fp16" else 3.38e38
        return ir.tensor(np.clip(array, -limit, limit).astype(low_np), name=tensor.name)

    for value in graph.initializers.values():
        if value.dtype == fp32 and value.const_value is not None:
            value.const_value = convert(value.const_value)
            value.dtype = low
    nodes = list(graph)
    for node in nodes:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise UnsupportedError(f"--precision {precision}: node {node.name} ({node.op_type}) has a subgraph")
        for name in ("to", "dtype"):
            attr = node.attributes.get(name)
            if attr is not None and attr.type == ir.AttributeType.INT and attr.value == fp32:
                node.attributes[name] = ir.AttrInt64(name, low)
        value_attr = node.attributes.get("value")
        if value_attr is not None and value_attr.type == ir.AttributeType.TENSOR and value_attr.value.dtype == fp32:
            node.attributes["value"] = ir.AttrTensor("value", convert(value_attr.value))
        if node.op_type == "Constant" and "value_float" in node.attributes:
            number = np.array(node.attributes.pop("value_float").value, dtype=np.float32)
            node.attributes["value"] = ir.AttrTensor("value", convert(ir.tensor(number)))
        if node.op_type == "Constant" and "value_floats" in node.attributes:
            numbers = np.array(node.attributes.pop("value_floats").value, dtype=np.float32)
            node.attributes["value"] = ir.AttrTensor("value", convert(ir.tensor(numbers)))
        for out in node.outputs:
            if out.dtype == fp32:
                out.dtype = low
    for node in nodes:
        if node.op_type in KEEP_FP32:
            _keep_fp32(graph, node, low)
    for value in list(graph.inputs):
        if value.dtype == fp32:
            uses = list(value.uses())
            cast = ir.node("Cast", [value], attributes={"to": low}, name=f"{value.name}_to_{precision}")
            cast.outputs[0].dtype, cast.outputs[0].shape = low, value.shape
            graph.insert_before(nodes[0], cast) if nodes else graph.append(cast)
            for user, index in uses:
                user.replace_input_with(index, cast.outputs[0])
    for index, value in enumerate(list(graph.outputs)):
        if value.dtype == low:
            name = value.name
            value.name = f"{name}__{precision}"
            cast = ir.node("Cast", [value], attributes={"to": fp32}, name=f"{name}_to_fp32")
            cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, fp32, value.shape
            graph.append(cast)
            graph.outputs[index] = cast.outputs[0]


def _keep_fp32(graph: Any, node: Any, low: Any) -> None:
    import onnx_ir as ir

    for index, value in enumerate(node.inputs):
        if value is not None and value.dtype == low:
            up = ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT})
            up.outputs[0].dtype, up.outputs[0].shape = ir.DataType.FLOAT, value.shape
            graph.insert_before(node, up)
            node.replace_input_with(index, up.outputs[0])
    out = node.outputs[0]
    uses = list(out.uses())
    outputs = [i for i, v in enumerate(graph.outputs) if v is out]
    down = ir.node("Cast", [out], attributes={"to": low})
    down.outputs[0].dtype, down.outputs[0].shape = low, out.shape
    if out.name:  # the cast takes over the name (it may be a graph output)
        name = out.name
        out.name = f"{name}__fp32"
        down.outputs[0].name = name
    out.dtype = ir.DataType.FLOAT
    graph.insert_after(node, down)
    for user, index in uses:
        user.replace_input_with(index, down.outputs[0])
    for index in outputs:
        graph.outputs[index] = down.outputs[0]
