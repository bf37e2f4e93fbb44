"""Weights the graph only transposes, stored transposed.

The exporter writes ``aten.linear`` on a 3-D input as ``MatMul(x, Transpose(W))`` with ``W`` the
state-dict tensor, and onnxruntime folds each such transpose into a new initializer when it builds a
session: for a while it holds both layouts of every linear weight (measured: building the session of
an unmerged BERT-base-sized model took about twice its weights). :func:`store_transposed` replaces each
``Transpose`` whose only input is an initializer read by nothing else with that initializer already
transposed (the same values, moved: exact), named ``<name>.T``; the original is no longer stored, so the
file does not grow. The new tensors are computed lazily, one at a time, as the streaming writer
(``streaming.py``) writes them: no transposed copy of the weights is held while saving.

Initializers the caller names in ``keep`` (adapter tensors, which keep their names and stored layout;
adapter slots, which are graph inputs) and packed sub-byte types are left as they are.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

SUFFIX = ".T"


def store_transposed(model: Any, keep: Collection[str] = ()) -> int:
    """Fold each ``Transpose`` of an initializer that nothing else reads into a transposed initializer,
    in place; return how many were folded."""
    import onnx_ir

    graph, folded = model.graph, 0
    taken = {v.name for node in graph for v in node.outputs} | set(graph.initializers) | {v.name for v in graph.inputs}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        value = node.inputs[0]
        if not _foldable(value, keep) or node.outputs[0].is_graph_output() or f"{value.name}{SUFFIX}" in taken:
            continue
        tensor = value.const_value
        attribute = node.attributes.get("perm")
        perm = tuple(attribute.value) if attribute is not None else tuple(reversed(range(len(tensor.shape))))
        shape = onnx_ir.Shape([tensor.shape[axis] for axis in perm])
        name = f"{value.name}{SUFFIX}"
        lazy = onnx_ir.LazyTensor(partial_transpose(tensor, perm), dtype=tensor.dtype, shape=shape, name=name)
        stored = onnx_ir.Value(name=name, shape=shape, type=onnx_ir.TensorType(tensor.dtype), const_value=lazy)
        graph.register_initializer(stored)
        onnx_ir.convenience.replace_all_uses_with(node.outputs[0], stored, replace_graph_outputs=False)
        graph.remove(node, safe=True)
        del graph.initializers[value.name]
        taken.add(name)
        folded += 1
    return folded


def _foldable(value: Any, keep: Collection[str]) -> bool:
    if value is None or not value.is_initializer() or value.is_graph_input() or value.is_graph_output():
        return False
    tensor = value.const_value
    if value.name in keep or tensor is None or tensor.dtype.bitwidth < 8 or len(value.uses()) != 1:
        return False
    return tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape.dims)


def partial_transpose(tensor: Any, perm: tuple[int, ...]) -> Any:
    """A function returning ``tensor`` transposed by ``perm`` as a contiguous ``onnx_ir.Tensor``."""
    import onnx_ir

    def transposed() -> Any:
        return onnx_ir.Tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)), dtype=tensor.dtype)

    return transposed
