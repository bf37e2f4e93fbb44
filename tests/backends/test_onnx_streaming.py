"""``peftc.backends.onnx.streaming.save`` writes the bytes ``onnx_ir.save`` writes, without a serialized copy of the weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir
import pytest
import torch
from onnx_ir.tensor_adapters import TorchTensor

from peftc.backends.onnx import streaming


def _model() -> onnx_ir.Model:
    """Initializers of every kind a lowering holds: numpy and torch tensors in several dtypes (bf16, int4
    packed), one read back from a proto, one that is also a graph input, one with metadata; and a node."""
    rng = np.random.default_rng(0)
    tensors = {
        "w_f32": onnx_ir.tensor(rng.standard_normal((300, 17)).astype(np.float32)),
        "w_torch": TorchTensor(torch.randn(64, 33)),
        "w_bf16": TorchTensor(torch.randn(40, 3).to(torch.bfloat16)),
        "w_f16": onnx_ir.tensor(rng.standard_normal(129).astype(np.float16)),
        "ids": onnx_ir.tensor(np.arange(5, dtype=np.int64)),
        "q_int4": onnx_ir.tensor(np.array([1, -2, 3, 7, -8], dtype=np.int8), dtype=onnx_ir.DataType.INT4),
        "from_proto": onnx_ir.serde.deserialize_tensor(onnx.numpy_helper.from_array(np.ones((2, 2), np.float32), "x")),
        "scalar": onnx_ir.tensor(np.float32(2.5)),
    }
    tensors["w_f32"].metadata_props["origin"] = "test"
    x = onnx_ir.Value(name="x", shape=onnx_ir.Shape([300]), type=onnx_ir.TensorType(onnx_ir.DataType.FLOAT))
    values = {name: onnx_ir.Value(name=name, const_value=t, shape=t.shape, type=onnx_ir.TensorType(t.dtype))
              for name, t in tensors.items()}  # fmt: skip
    node = onnx_ir.Node("", "MatMul", [x, values["w_f32"]], name="mm")
    node.outputs[0].name = "y"
    graph = onnx_ir.Graph(
        [x, values["scalar"]], node.outputs, nodes=[node], initializers=list(values.values()), name="g", doc_string="d"
    )
    return onnx_ir.Model(graph, ir_version=10, producer_name="peftc-test", metadata_props={"k": "v"})


def test_writes_the_bytes_onnx_ir_writes(tmp_path):
    model = _model()
    onnx_ir.save(model, tmp_path / "reference.onnx")
    streaming.save(model, tmp_path / "streamed.onnx")
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()
    loaded = onnx.load(str(tmp_path / "streamed.onnx"))
    assert [t.name for t in loaded.graph.initializer] == list(model.graph.initializers)
    assert model.graph.initializers["w_torch"].const_value.raw.shape == (64, 33)  # the model's tensors are back


def test_a_short_write_is_caught(tmp_path, monkeypatch):
    """The length written in front of a tensor's bytes is checked against what its ``tofile`` wrote."""
    model = _model()
    monkeypatch.setattr(TorchTensor, "tofile", lambda self, file: file.write(self.tobytes()[:-4]))
    with pytest.raises(AssertionError, match="w_torch: wrote"):
        streaming.save(model, tmp_path / "streamed.onnx")
