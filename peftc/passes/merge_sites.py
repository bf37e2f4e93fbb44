"""merge: fold every adapter site into the base weights (``shared/methods.md`` §2–§4).

Merging is exact up to rounding because every mergeable method is a weight transform
(``peftc/ops/base.py``):

1. **Weight sites** ``W' = op(W, factors…)`` are evaluated with the op's own body (fp32, cast back to
   the parameter's dtype) and replaced by a parameter holding ``W'``. Chains (stacked adapters)
   fold from the parameter outwards. A module called several times yields identical chains, which
   share one merged parameter.
2. **Call sites** (``peftc::lora_linear``) become their weight-form equivalent,
   ``W' = lora_weight(W, A, B, s)`` and ``b' = b + s·b_B``, and the plain base op again:
   ``aten.linear(x, W', b')``, or ``aten.matmul(x, W') + b'`` for a ``[d_in, d_out]`` (Conv1D) weight.

The merged value takes the original parameter's state-dict key when nothing else reads that
parameter; otherwise (a weight tied with an unadapted module) it becomes a new ``<key>_merged``
parameter and the other readers keep the original (``untied``).

Refusals leave the site unmerged with a diagnostic: a parameter that is not floating point
(quantized), or an operand computed in the graph rather than stored. A non-finite merged weight is
an error naming the adapter and module: the adapter is broken.

After the pass no weight or call site remains except the refused ones; activation sites are left to
``fold-ssf`` and ``fold-linear-adapters``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

from peftc import ir
from peftc.errors import InputError
from peftc.ops import SITE_OPS
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult

LORA_LINEAR = torch.ops.peftc.lora_linear.default
WEIGHT_OPS = {op.overload for op in SITE_OPS.values() if op.form == "weight"}
# Activation sites (SSF, linear adapters, temporal shift) are folded by their own passes.
SITE_TARGETS = {op.overload for op in SITE_OPS.values() if op.form != "activation"}


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """The merge has no knobs: it computes in fp32 and casts back to each parameter's dtype."""


class MergeSitesPass(PassBase):
    """Fold adapter sites into the weights they adapt."""

    name = "merge"

    def __init__(self) -> None:
        self.options = MergeOptions()

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        diagnostics: list[Diagnostic] = []
        merged = untied = 0
        with torch.no_grad():
            folded, refused = _fold_weight_sites(editor)
            diagnostics += refused
            for group in _groups(folded, editor):
                untied += _materialize(editor, group, folded)
                merged += sum(1 for _ in _chain(group[0]))
            calls: dict[fx.Node, list[fx.Node]] = {}
            for node in editor.graph.nodes:
                if node.op == "call_function" and node.target is LORA_LINEAR:
                    calls.setdefault(node.args[1], []).append(node)
            for weight, sites in calls.items():
                reason = _call_refusal(editor, weight, sites)
                if reason:
                    diagnostics += [Diagnostic(_site_name(s), reason) for s in sites]
                    continue
                untied += _merge_call_sites(editor, sites)
                merged += len(sites)
        stats = {"merged": merged, "skipped": len(diagnostics), "untied": untied}
        if not merged:
            return PassResult(program, False, stats, tuple(diagnostics))
        editor.eliminate_dead_code()
        return PassResult(editor.finish(), True, stats, tuple(diagnostics))

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        left = sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target in SITE_TARGETS)
        if left != result.stats["skipped"]:
            raise AssertionError(f"{left} sites left, {result.stats['skipped']} reported skipped")


def _fold_weight_sites(editor: ir.ProgramEditor) -> tuple[dict[fx.Node, torch.Tensor], list[Diagnostic]]:
    """Evaluate every weight site whose operands are stored (or already folded) tensors."""
    folded: dict[fx.Node, torch.Tensor] = {}
    refused: list[Diagnostic] = []
    for node in editor.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_OPS:
            continue
        values: list[Any] = []
        reason = None
        for arg in node.args:
            if not isinstance(arg, fx.Node):
                values.append(arg)
                continue
            value = folded.get(arg)
            value = editor.tensor(arg) if value is None else value
            if value is None:
                reason = f"operand {arg.name} is computed in the graph, not a stored tensor"
                break
            values.append(value)
        if reason is None and not values[0].dtype.is_floating_point:
            reason = (
                f"the base parameter is {str(values[0].dtype).removeprefix('torch.')}; merging into a quantized "
                "base is not supported: keep the site unmerged (--no-merge)"
            )
        if reason:
            refused.append(Diagnostic(_site_name(node), reason))
            continue
        value = node.target(*values)
        if not torch.isfinite(value).all():
            info = node.meta.get(ir.meta.PEFTC, {})
            raise InputError(
                f"adapter {info.get('adapter', '?')!r}: merged weight of {info.get('module', node.name)!r} is not "
                "finite; the adapter tensors are broken"
            )
        folded[node] = value
    return folded, refused


def _chain(node: fx.Node):
    """The weight-site nodes from ``node`` back to the stored parameter."""
    while node.op == "call_function" and node.target in WEIGHT_OPS:
        yield node
        node = node.args[0]


def _root(node: fx.Node) -> fx.Node:
    for site in _chain(node):
        node = site.args[0]
    return node


def _key(node: Any) -> Any:
    """Structural identity of a chain: same op on the same placeholders and scalars."""
    if isinstance(node, fx.Node):
        if node.op == "placeholder":
            return node.name
        return (str(node.target), tuple(_key(a) for a in node.args))
    return node


def _groups(folded: dict[fx.Node, torch.Tensor], editor: ir.ProgramEditor) -> list[list[fx.Node]]:
    """Folded chain ends (read by non-site nodes), grouped when they compute the same value."""
    ends = [n for n in folded if any(u not in folded for u in n.users)]
    groups: dict[Any, list[fx.Node]] = {}
    for node in ends:
        groups.setdefault(_key(node), []).append(node)
    return list(groups.values())


def _materialize(editor: ir.ProgramEditor, group: list[fx.Node], folded: dict[fx.Node, torch.Tensor]) -> int:
    """Put the folded value into a parameter and reroute the group's readers to it."""
    value = folded[group[0]]
    root = _root(group[0])
    fqn = editor.fqn(root)
    chains = {site for end in group for site in _chain(end)}
    others = [u for u in root.users if u not in chains and u not in folded]
    if others:
        target = editor.add_parameter(_fresh(editor, f"{fqn}_merged"), value)
    else:
        editor.set_tensor(fqn, value)
        target = root
    for end in group:
        end.replace_all_uses_with(target)
    return int(bool(others))


def _call_refusal(editor: ir.ProgramEditor, weight: Any, sites: list[fx.Node]) -> str | None:
    w = editor.tensor(weight)
    if w is None:
        return f"the base weight is computed in the graph ({weight.name}), not a stored parameter"
    if not w.dtype.is_floating_point:
        return (
            f"the base weight is {str(w.dtype).removeprefix('torch.')}; merging into a quantized base "
            "is not supported: keep the site unmerged (--no-merge)"
        )
    if len({tuple(s.args[2:]) for s in sites}) > 1:
        return "one tied weight is adapted differently by several sites"
    for arg in sites[0].args[3:6]:
        if isinstance(arg, fx.Node) and editor.tensor(arg) is None:
            return f"adapter tensor {arg.name} is computed in the graph, not stored"
    return None


def _merge_call_sites(editor: ir.ProgramEditor, sites: list[fx.Node]) -> int:
    """``lora_linear`` sites sharing a weight → the plain base op on ``W'``, ``b'``."""
    _x, weight, bias, a, b, b_bias, scale, fan_in_fan_out = sites[0].args
    module = sites[0].meta.get(ir.meta.PEFTC, {}).get("module", _site_name(sites[0]))
    layout = "linear_t" if fan_in_fan_out else "linear"
    merged_w = torch.ops.peftc.lora_weight(editor.tensor(weight), editor.tensor(a), editor.tensor(b), scale, layout)
    if not torch.isfinite(merged_w).all():
        adapter = sites[0].meta.get(ir.meta.PEFTC, {}).get("adapter", "?")
        raise InputError(
            f"adapter {adapter!r}: merged weight of {module!r} is not finite; the adapter tensors are broken"
        )
    weight_node, untied = _writable(editor, weight, sites, f"{module}.weight")
    editor.set_tensor(editor.fqn(weight_node), merged_w)
    bias_node = bias
    if b_bias is not None:
        if bias is None:
            zero = torch.zeros_like(editor.tensor(b_bias), dtype=merged_w.dtype)
            bias_node = editor.add_parameter(
                _fresh(editor, f"{module}.bias"), torch.ops.peftc.lora_bias(zero, editor.tensor(b_bias), scale)
            )
        else:
            bias_node, tied = _writable(editor, bias, sites, f"{module}.bias")
            untied += tied
            editor.set_tensor(
                editor.fqn(bias_node), torch.ops.peftc.lora_bias(editor.tensor(bias), editor.tensor(b_bias), scale)
            )
    for site in sites:
        x = site.args[0]
        if fan_in_fan_out:
            out = editor.call(torch.ops.aten.matmul.default, (x, weight_node), like=site)
            if bias_node is not None:
                out = editor.call(torch.ops.aten.add.Tensor, (out, bias_node), like=site)
        else:
            out = editor.call(torch.ops.aten.linear.default, (x, weight_node, bias_node), like=site)
        editor.replace(site, out)
    return untied


def _writable(editor: ir.ProgramEditor, node: fx.Node, sites: list[fx.Node], fqn: str) -> tuple[fx.Node, int]:
    """``node`` itself if only these sites read it, else a new parameter copy for them (untied)."""
    if set(node.users) <= set(sites):
        return node, 0
    copy = editor.add_parameter(_fresh(editor, f"{fqn}_merged"), editor.tensor(node))
    for site in sites:
        site.replace_input_with(node, copy)
    return copy, 1


def _fresh(editor: ir.ProgramEditor, fqn: str) -> str:
    candidate, index = fqn, 1
    while editor.has_state(candidate):
        index += 1
        candidate = f"{fqn}{index}"
    return candidate


def _site_name(node: fx.Node) -> str:
    return node.meta.get(ir.meta.PEFTC, {}).get("module") or ir.meta.module_path(node) or node.name
