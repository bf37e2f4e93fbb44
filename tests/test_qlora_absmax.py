"""A double-quantized NF4 layer (bitsandbytes' ``compress_statistics``) keeps its 8-bit absmax in the ONNX
artifact and decodes it in the graph before MatMulBnb4: the same outputs, bit for bit, as the artifact
that stores the absmax decoded to fp32, and smaller by what the 8-bit codes save.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from peftc.loaders.inputs import parse_inputs
from peftc.quant import qlora
from peftc.quant.modules import Bnb4Linear, Bnb4NestedLinear

F = pytest.importorskip("bitsandbytes").functional
N, K, BLOCK = 256, 768, 64


@pytest.fixture(scope="module")
def layers():
    """bitsandbytes' own double quantization of a random weight, as peftc keeps it and as fp32 absmax."""
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = F.quantize_4bit(weight, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    nested = {"absmax_codes": state.absmax, "nested_absmax": state.state2.absmax, "nested_code": state.state2.code}
    kept = Bnb4NestedLinear(packed, nested, state.state2.blocksize, float(state.offset), state.code, BLOCK, "nf4",
                            (N, K), None)  # fmt: skip
    decoded = Bnb4Linear(packed, kept.absmax, state.code, BLOCK, "nf4", (N, K), None)
    return kept, decoded, packed, state


def lowered(module, directory):
    import onnx

    directory.mkdir()
    run = qlora.lower(torch.nn.Sequential(module), "onnx", directory, parse_inputs([f"input:batch,{K}:float32"]))
    return run, onnx.load(str(directory / "model.onnx")), (directory / "model.onnx").stat().st_size


def test_absmax_stays_8bit_and_decodes_exactly(layers, tmp_path):
    """The decode is bitsandbytes' ``dequantize_blockwise`` + offset in fp32, in the graph as in eager; the
    file stores uint8 codes, one fp32 scale per 256 and the 256-entry code table instead of fp32 absmax."""
    kept, decoded, packed, state = layers
    assert torch.equal(kept.absmax, F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    assert torch.equal(kept.dequantized(), F.dequantize_4bit(packed, state).float())
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    new, model, new_size = lowered(kept, tmp_path / "kept")
    old, _, old_size = lowered(decoded, tmp_path / "decoded")
    assert torch.equal(new({"input": x}), old({"input": x}))
    stored = {i.name.rpartition(".")[2]: i for i in model.graph.initializer}
    blocks = N * K // BLOCK
    assert stored["absmax_codes"].data_type == 2 and list(stored["absmax_codes"].dims) == [blocks]  # uint8
    assert not any(list(i.dims) == [blocks] and i.data_type == 1 for i in model.graph.initializer)  # no fp32 absmax
    saved = blocks * 4 - (blocks + -(-blocks // 256) * 4 + 256 * 4)
    assert 0 <= saved - (old_size - new_size) < 2048  # the decode's few nodes and constants
    assert kept.stored_bytes() == decoded.stored_bytes() - saved
    # A mutation: the decode without bitsandbytes' offset (the mean it subtracted before quantizing).
    (add,) = [n for n in model.graph.node if n.op_type == "Add"]
    (offset,) = [i for i in model.graph.initializer if i.name in add.input]
    assert numpy_helper.to_array(offset) == np.float32(state.offset)
    offset.CopyFrom(numpy_helper.from_array(np.zeros((), np.float32), offset.name))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    broken = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert qlora.relative_error(broken, old({"input": x})) > 1e-2
