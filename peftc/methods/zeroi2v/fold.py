"""fold-linear-adapters: fold ZeroI2V's linear adapters into the neighbouring projection (§4.5).

A ``peftc::linear_adapter(x, W₁, b₁, W₂, b₂, s, residual)`` node is the affine map
``f(x) = M x + c`` with ``M = I + s·W₂W₁`` and ``c = s·(W₂b₁ + b₂)`` (``ops.py``). It is
folded, exactly in float (fp32, cast back to the parameter's dtype), into the Linear on the side
the adapter was placed (recorded by ``insert-sites`` as the site's ``position``), else the other:

1. **input side** — the adapter sits before the projection (ZeroI2V's ``T_Adapter_in`` before the
   attention in-projection, ``MLP_Adapter`` before ``fc1``/``c_fc``): every reader of ``f(x)`` is a
   Linear taking it as input, and each becomes ``W' = W·M``, ``b' = W·c + b``;
2. **output side** — the adapter sits after the projection (``S_Adapter`` after the attention
   out-projection, ``MLP_Adapter_out`` after ``fc2``/``c_proj``): ``x`` comes from a Linear that
   nothing else reads, which becomes ``W' = M·W``, ``b' = M·b + c``.

:mod:`peftc.passes.neighbours` decides which layers qualify. An adapter with neither stays a
``peftc::linear_adapter`` node (exporters decompose it into two MatMuls) and is reported with the
reasons. A parameter other nodes read too is copied for the folded layer (``untied``, reported).
After the pass no foldable adapter remains.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch import fx

from peftc import ir
from peftc.methods.zeroi2v.ops import LINEAR_ADAPTER, adapter_affine, fold_input, fold_output
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult
from peftc.passes.neighbours import Layer, consumers_of, producer_of, site_name, stored, write_layer


@dataclasses.dataclass(frozen=True)
class FoldLinearAdaptersOptions:
    """No knobs: folds compute in fp32 and cast back to each parameter's dtype."""


class FoldLinearAdaptersPass(PassBase):
    """Fold linear adapters into the projection after (1.) or before (2.) them."""

    name = "fold-linear-adapters"

    def __init__(self) -> None:
        self.options = FoldLinearAdaptersOptions()

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        stats: Counter[str] = Counter(folded_input_side=0, folded_output_side=0, kept=0, untied=0)
        diagnostics: list[Diagnostic] = []
        targets = [n for n in editor.graph.nodes if n.op == "call_function" and n.target is LINEAR_ADAPTER.overload]
        with torch.no_grad():
            for node in targets:
                outcome, untied, note = _fold_site(editor, node)
                stats[outcome] += 1
                stats["untied"] += untied
                if note:
                    diagnostics.append(note)
        if stats["kept"] == len(targets):
            return PassResult(program, False, dict(stats), tuple(diagnostics))
        return PassResult(editor.finish(), True, dict(stats), tuple(diagnostics))

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        left = sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target is LINEAR_ADAPTER.overload)
        if left != result.stats["kept"]:
            raise AssertionError(f"{left} linear adapters left, {result.stats['kept']} reported kept")


def _fold_site(editor: ir.ProgramEditor, node: fx.Node) -> tuple[str, int, Diagnostic | None]:
    x = node.args[0]
    site = site_name(node)
    tensors = [stored(editor, a) if isinstance(a, fx.Node) else None for a in node.args[1:5]]
    missing = [a.name for a, t in zip(node.args[1:5], tensors, strict=True) if isinstance(a, fx.Node) and t is None]
    if missing:
        return "kept", 0, Diagnostic(site, f"kept: adapter tensor {missing[0]} is computed in the graph, not stored")
    matrix, offset = adapter_affine(*tensors, *node.args[5:7])
    axis = node.meta["val"].dim() - 1
    reasons = {}
    sides = ["input", "output"]
    if node.meta.get(ir.meta.PEFTC, {}).get("position") == "output":
        sides.reverse()
    for side in sides:
        if side == "input":
            found = consumers_of(editor, node, axis, ("linear",))
            if isinstance(found, list):
                untied = sum(write_layer(editor, layer, *_input(editor, layer, matrix, offset)) for layer in found)
                return _done(node, x, "folded_input_side", untied, site, found[0])
        else:
            found = producer_of(editor, x, axis, ("linear",), node)
            if isinstance(found, Layer):
                untied = write_layer(editor, found, *_output(editor, found, matrix, offset))
                return _done(node, x, "folded_output_side", untied, site, found)
        reasons[side] = found
    why = f"kept: no projection after it ({reasons['input']}), nor before it ({reasons['output']})"
    return "kept", 0, Diagnostic(site, why)


def _input(editor: ir.ProgramEditor, layer: Layer, matrix: torch.Tensor, offset: torch.Tensor):
    return fold_input(stored(editor, layer.weight), stored(editor, layer.bias), matrix, offset)


def _output(editor: ir.ProgramEditor, layer: Layer, matrix: torch.Tensor, offset: torch.Tensor):
    return fold_output(stored(editor, layer.weight), stored(editor, layer.bias), matrix, offset)


def _done(
    node: fx.Node, x: fx.Node, outcome: str, untied: int, site: str, layer: Layer
) -> tuple[str, int, Diagnostic | None]:
    node.replace_all_uses_with(x)
    node.graph.erase_node(node)
    note = None
    if untied:
        note = Diagnostic(
            site, f"{layer.label} shares parameters with other nodes: it got its own folded copy", "warning"
        )
    return outcome, untied, note
