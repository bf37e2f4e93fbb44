"""fold-ssf: fold every SSF scale-shift into a neighbouring layer (``shared/methods.md`` §4.1).

Each ``peftc::ssf(x, γ, β, axis)`` node computes ``γ ⊙ x + β`` per channel. It is folded, exactly in
float (fp32, cast back to each parameter's dtype; math in ``ops.py``):

1. **into the producer of x** when ``x`` comes — through layout ops only — from a Linear or
   convolution (``W' = diag(γ)·W``, ``b' = γ ⊙ b + β``, a missing bias becomes ``β``) or from a
   LayerNorm/GroupNorm/BatchNorm with an affine (``γ_n' = γ ⊙ γ_n``, ``β_n' = γ ⊙ β_n + β``), and nothing
   else reads ``x``. This covers every SSF placement of the official ViT/Swin/ConvNeXt code (after
   patch-embed conv and its norm, qkv, attention proj, fc1 — before its GELU —, fc2, norm1/norm2,
   the final norm);
2. otherwise **into the consumers** when every reader of the result is a Linear or an unpadded,
   ungrouped convolution taking it as input (``W' = W·diag(γ)``, ``b' = b + W·β``);
3. otherwise it stays as a plain ``mul`` and ``add`` (γ, β stored pre-shaped to broadcast), reported
   with the reason neither side could take it (e.g. a residual sum feeding a padded conv).

:mod:`peftc.passes.neighbours` decides which layers qualify. A parameter that other nodes read too
(a module called twice, tied weights) is copied for the folded layer (``untied``, reported). After the
pass no ``peftc::ssf`` node remains; when everything folds, the program has the base model's nodes
and parameter count (the tests compare the canonical graph text with the base's).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch import fx

from peftc import ir
from peftc.methods.ssf.ops import SSF, fold_after, fold_before
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult
from peftc.passes.neighbours import Layer, consumers_of, producer_of, site_name, stored, write_layer


@dataclasses.dataclass(frozen=True)
class FoldSsfOptions:
    """No knobs: folds compute in fp32 and cast back to each parameter's dtype."""


class FoldSsfPass(PassBase):
    """Fold SSF scale-shifts into producers (1.), else consumers (2.), else keep them as mul/add (3.)."""

    name = "fold-ssf"

    def __init__(self) -> None:
        self.options = FoldSsfOptions()

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        stats: Counter[str] = Counter(folded=0, folded_into_consumer=0, kept=0, untied=0)
        diagnostics: list[Diagnostic] = []
        with torch.no_grad():
            for node in [n for n in editor.graph.nodes if n.op == "call_function" and n.target is SSF.overload]:
                outcome, untied, note = _fold_site(editor, node)
                stats[outcome] += 1
                stats["untied"] += untied
                if note:
                    diagnostics.append(note)
        if not sum(stats.values()):
            return PassResult(program, False, dict(stats))
        return PassResult(editor.finish(), True, dict(stats), tuple(diagnostics))

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        left = [n.name for n in program.graph.nodes if n.op == "call_function" and n.target is SSF.overload]
        if left:
            raise AssertionError(f"peftc::ssf nodes left: {left}")


def _fold_site(editor: ir.ProgramEditor, node: fx.Node) -> tuple[str, int, Diagnostic | None]:
    """Fold one site; return the stats key, how many parameters were untied, and a diagnostic."""
    x, scale_node, shift_node, axis = node.args
    site = site_name(node)
    scale, shift = stored(editor, scale_node), stored(editor, shift_node)
    if scale is None or shift is None:
        _keep(editor, node)
        return "kept", 0, Diagnostic(site, "kept as mul/add: its scale or shift is computed in the graph, not stored")
    producer = producer_of(editor, x, axis, ("linear", "conv", "norm"), node)
    if isinstance(producer, Layer):
        untied = _into_producer(editor, producer, scale, shift)
        _remove(node, x)
        return "folded", untied, _untied_note(site, producer, untied)
    consumers = consumers_of(editor, node, axis, ("linear", "conv"))
    if isinstance(consumers, list):
        untied = sum(_into_consumer(editor, layer, scale, shift) for layer in consumers)
        _remove(node, x)
        return "folded_into_consumer", untied, _untied_note(site, consumers[0], untied)
    _keep(editor, node)
    why = f"kept as mul/add: no producer to fold into ({producer}), nor consumers ({consumers})"
    return "kept", 0, Diagnostic(site, why)


def _into_producer(editor: ir.ProgramEditor, layer: Layer, scale: torch.Tensor, shift: torch.Tensor) -> int:
    weight, bias = fold_after(stored(editor, layer.weight), stored(editor, layer.bias), scale, shift)
    return write_layer(editor, layer, weight, bias)


def _into_consumer(editor: ir.ProgramEditor, layer: Layer, scale: torch.Tensor, shift: torch.Tensor) -> int:
    weight, bias = fold_before(stored(editor, layer.weight), stored(editor, layer.bias), scale, shift)
    return write_layer(editor, layer, weight, bias)


def _remove(node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


def _keep(editor: ir.ProgramEditor, node: fx.Node) -> None:
    """Replace the site by ``x * γ + β`` with γ and β stored in the shape that broadcasts along its axis."""
    x, scale_node, shift_node, axis = node.args
    rank = node.meta["val"].dim()
    shape = [-1] + [1] * (rank - axis - 1)
    dtype = node.meta["val"].dtype
    scale_b = _shaped(editor, scale_node, shape, dtype)
    shift_b = _shaped(editor, shift_node, shape, dtype)
    product = editor.call(torch.ops.aten.mul.Tensor, (x, scale_b), like=node)
    result = editor.call(torch.ops.aten.add.Tensor, (product, shift_b), like=node)
    ir.meta.peftc_meta(result).update({k: v for k, v in node.meta.get(ir.meta.PEFTC, {}).items() if k != "from_pass"})
    editor.replace(node, result)


def _shaped(editor: ir.ProgramEditor, node: fx.Node, shape: list[int], dtype: torch.dtype) -> fx.Node:
    tensor = stored(editor, node)
    if tensor is None:  # computed in the graph: reshape it there
        return editor.call(torch.ops.aten.reshape.default, (node, shape), like=node)
    value = tensor.detach().to(dtype).reshape(shape)
    if tuple(tensor.shape) == tuple(value.shape) and tensor.dtype == dtype:
        return node
    fqn = f"{editor.fqn(node)}_broadcast"
    existing = editor.node_for(fqn)
    if existing is not None and tuple(editor.tensor(existing).shape) == tuple(value.shape):
        return existing
    info = dict(node.meta.get(ir.meta.PEFTC, {}))
    return editor.add_parameter(fqn if existing is None else f"{fqn}_{len(shape)}", value, **info)


def _untied_note(site: str, layer: Layer, untied: int) -> Diagnostic | None:
    if not untied:
        return None
    return Diagnostic(
        site, f"{layer.label} shares parameters with other nodes: it got its own folded copy", kind="warning"
    )
