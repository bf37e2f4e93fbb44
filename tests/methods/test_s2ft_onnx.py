"""The ONNX translations of the unmerged S²FT ops (``peftc/methods/s2ft_onnx.py``): equal to a dense
eager reference (the base weight with the block added entry by entry, written out here) in fp32, and
in fp16 as the eager op rounds; the graph's structure (no ``Gather``, ``ScatterND``, ``Pad`` or ``Split``:
rows updated by one ``ScatterElements`` add, an fp32 column site one GEMM over ``[x, x_I]`` and the
stacked ``[Wᵀ; Sᵀ]``, a slot's columns kept apart from the base weight); broken translations (a replacing
scatter, a slice one channel off) are caught."""

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
        ("slot_columns", 1, COLUMNS_I, False),
    ):
        k = len(indices)
        block = torch.randn((k, D_IN) if dim == 0 else (D_OUT, k), generator=generator)
        if name == "slot_rows":
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


def _producers(model):
    return {output: node for node in model.graph.node for output in node.output}


def test_graph_structure(lowered):
    _, model = lowered
    ops = Counter(node.op_type for node in model.graph.node)
    # fp32: 3 row sites × 2 MatMuls, 2 stacked column sites × 1, the slot's columns × 2; fp16: 6 sites × 2
    assert ops["ScatterElements"] == 6 and ops["GatherElements"] == 4 and ops["MatMul"] == 8 + 2 + 12, ops
    assert not {"Gather", "ScatterND", "Pad", "Split"} & set(ops), ops
    made = _producers(model)
    stacked = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and made.get(n.input[0]) and made[n.input[0]].op_type == "Concat"
    ]
    assert len(stacked) == 2, [n.name for n in stacked]  # the fp32 columns and slice_columns sites
    for node in stacked:
        activation, weights = made[node.input[0]], made[node.input[1]]
        assert activation.input[0] == model.graph.input[0].name, activation.input  # [x, x_I]: no other copy
        assert {made[i].op_type for i in activation.input[1:]} <= {"GatherElements", "Slice"}
        assert weights.op_type == "Concat" and {made[i].op_type for i in weights.input} == {"Transpose"}
    other = {
        made[i].op_type if i in made else "input" for n in model.graph.node if n.op_type == "Concat" for i in n.input
    }
    assert other <= {"Shape", "Constant", "input", "GatherElements", "Slice", "Transpose"}, other


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


def test_mutation_slice_one_channel_off_is_caught(lowered):
    """Slicing the input columns ``start + 1 … start + k`` (and scattering into those rows) instead of
    ``start …`` fails the dense comparison of both slice sites."""
    module, model = lowered
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    made = _producers(broken)
    shifted = {made[n.input[i]].name for n in broken.graph.node if n.op_type == "Slice" for i in (1, 2)}
    shifted |= {
        n.name for n in broken.graph.node if n.op_type == "Constant" and _ints(n) == list(range(START, START + K))
    }
    assert len(shifted) == 2 * 2 + 2, shifted  # per dtype: the slice's start and end, the rows' indices
    for node in broken.graph.node:
        if node.name in shifted:
            values = _ints(node)
            node.ClearField("attribute")
            node.attribute.append(onnx.helper.make_attribute("value_ints", [v + 1 for v in values]))
    got = _run(broken, X)
    for i, (name, _, _, dense) in enumerate(module.fp32.sites):
        if name.startswith("slice"):
            expected = torch.nn.functional.linear(X, dense, module.fp32.bias).numpy()
            assert np.abs(got[i] - expected).max() > 1e-2 * np.abs(expected).max(), name


def _ints(node):
    return next((list(a.ints) for a in node.attribute if a.name == "value_ints"), None)
