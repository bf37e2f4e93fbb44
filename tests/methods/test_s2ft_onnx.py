"""The ONNX translations of the unmerged S²FT ops (``peftc/methods/s2ft_onnx.py``): equal to a dense
eager reference (the base weight with the block added entry by entry, written out here) in fp32, and
in fp16 as the eager op rounds; no full-size copy of an activation in the graph (no ``Gather``,
``ScatterND``, ``Pad``, ``Concat`` or ``Split``: the selected columns are read with ``GatherElements``
or a ``Slice``, the rows updated by one ``ScatterElements`` add); a broken translation is caught."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from peftc.backends.onnx import translations
from peftc.methods import s2ft
from peftc.swap import ops as slot_ops

D_OUT, D_IN = 12, 10
ROWS_I, COLUMNS_I = [1, 4, 5, 11], [0, 3, 9]
START, K = 3, 4  # the slice sites: rows / columns 3…6


def _sites(dtype=torch.float32):
    """Per site: (name, op, its arguments after ``x, W, b``, the dense weight it equals)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(D_OUT, D_IN, generator=generator)
    bias = torch.randn(D_OUT, generator=generator)
    out = []
    for name, dim, indices, sliced in (
        ("rows", 0, ROWS_I, False),
        ("columns", 1, COLUMNS_I, False),
        ("slice_rows", 0, list(range(START, START + K)), True),
        ("slice_columns", 1, list(range(START, START + K)), True),
        ("slot_rows", 0, [*ROWS_I, 0, 0], False),  # zero-padded to capacity, as a slot is
    ):
        k = len(indices)
        block = torch.randn((k, D_IN) if dim == 0 else (D_OUT, k), generator=generator)
        if name.startswith("slot"):
            block[len(ROWS_I) :] = 0
        dense = weight.clone()
        for j, i in enumerate(indices):
            if dim == 0:
                dense[i, :] += block[j, :]
            else:
                dense[:, i] += block[:, j]
        index = torch.tensor(indices)
        op, args = (
            (s2ft.S2FT_SLICE_LINEAR, (block.to(dtype), START, dim))
            if sliced
            else (slot_ops.S2FT_SLOT if name.startswith("slot") else s2ft.S2FT_LINEAR, (index, block.to(dtype), dim))
        )
        out.append((name, op, args, dense))
    return weight.to(dtype), bias.to(dtype), out


class _Sites(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.weight, self.bias, self.sites = _sites(dtype)

    def forward(self, x):
        return tuple(op.overload(x, self.weight, self.bias, *args) for _, op, args, _ in self.sites)


def _export(module, x, path):
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    onnx_program = torch.onnx.export(
        program, dynamo=True, optimize=False, custom_translation_table=translations(), verbose=False
    )
    onnx_program.save(str(path))
    return onnx.load(str(path))


class _Both(torch.nn.Module):
    """The sites in fp32 and in fp16 (one export for both)."""

    def __init__(self):
        super().__init__()
        self.fp32, self.fp16 = _Sites(), _Sites(torch.float16)

    def forward(self, x):
        return (*self.fp32(x), *self.fp16(x.half()))


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    x = torch.randn(2, 7, D_IN, generator=torch.Generator().manual_seed(1))
    module = _Both()
    model = _export(module, x, tmp_path_factory.mktemp("s2ft_onnx") / "model.onnx")
    return module, model


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


X = torch.randn(5, 7, D_IN, generator=torch.Generator().manual_seed(2))  # another batch than traced


def test_translations_match_the_dense_reference(lowered):
    module, model = lowered
    sites = module.fp32
    for (name, _, _, dense), got in zip(sites.sites, _run(model, X), strict=False):
        expected = torch.nn.functional.linear(X, dense, sites.bias).numpy()
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), name


def test_no_full_size_copy_of_an_activation(lowered):
    _, model = lowered
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["ScatterElements"] == 6 and ops["GatherElements"] == 2 and ops["MatMul"] == 20, ops
    assert not {"Gather", "ScatterND", "Pad", "Split"} & set(ops), ops
    made = {output: node.op_type for node in model.graph.node for output in node.output}
    concatenated = {made.get(i, "initializer") for n in model.graph.node if n.op_type == "Concat" for i in n.input}
    assert concatenated <= {"Shape", "Constant"}, concatenated  # only the [..., k] index shape


def test_fp16_sites_compute_the_block_in_fp32_as_the_eager_ops(lowered):
    module, model = lowered
    sites, x = module.fp16, X.half()
    for (name, op, args, _), got in zip(sites.sites, _run(model, X)[len(sites.sites) :], strict=True):
        expected = op.overload(x, sites.weight, sites.bias, *args).float().numpy()
        # the same fp32 sum rounded once to fp16: at most one fp16 ulp apart (2^-10 relative)
        assert np.abs(got.astype(np.float32) - expected).max() <= 2**-10 * np.abs(expected).max(), name


def test_mutation_scatter_without_add_is_caught(lowered):
    """A row update that replaces the base rows instead of adding to them fails the dense comparison."""
    module, model = lowered
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    for node in broken.graph.node:
        for attribute in node.attribute:
            if node.op_type == "ScatterElements" and attribute.name == "reduction":
                attribute.s = b"none"
    got = _run(broken, X)[0]
    expected = torch.nn.functional.linear(X, module.fp32.sites[0][3], module.fp32.bias).numpy()
    assert np.abs(got - expected).max() > 1e-2 * np.abs(expected).max()
