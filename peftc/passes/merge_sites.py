"""merge: fold every adapter site into the base weights (``shared/methods.md`` §2–§4).

Merging is exact up to rounding because every mergeable method is a weight transform
(``peftc/ops.py``):

1. **Weight sites** ``W' = op(W, factors…)`` are evaluated with the op's own body (fp32, cast back to
   the parameter's dtype) and replaced by a parameter holding ``W'``. Chains (stacked adapters)
   fold from the parameter outwards. A module called several times yields identical chains, which
   share one merged parameter.
2. **Call sites** of a linear module (``peftc::lora_linear``) become their weight form (the op's
   ``SiteOp.weight_form``: ``W' = lora_weight(W, A, B, s)`` and ``b' = b + s·b_B``) and the plain base
   op again: ``aten.linear(x, W', b')``, or ``aten.matmul(x, W') + b'`` for a ``[d_in, d_out]``
   (Conv1D, ``fan_in_fan_out``) weight. Call sites without a weight form (adapter slots) are skipped.

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
from peftc.methods import registry
from peftc.ops import SiteOp
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult, fresh_name


def _ops_by_form(form: str) -> dict[Any, SiteOp]:
    return {op.overload: op for op in registry.site_ops().values() if op.form == form}


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
        weight_ops = set(_ops_by_form("weight"))
        call_ops = {target: op for target, op in _ops_by_form("call").items() if op.weight_form is not None}
        diagnostics: list[Diagnostic] = []
        merged = untied = 0
        with torch.no_grad():
            folded, refused = _fold_weight_sites(editor, weight_ops)
            diagnostics += refused
            for group in _groups(folded):
                untied += _materialize(editor, group, folded)
                merged += sum(1 for _ in _chain(group[0], folded))
            calls: dict[tuple[Any, fx.Node], list[fx.Node]] = {}
            for node in editor.graph.nodes:
                if node.op == "call_function" and node.target in call_ops:
                    calls.setdefault((node.target, node.args[1]), []).append(node)
            for (target, weight), sites in calls.items():
                reason = _call_refusal(editor, weight, sites, call_ops[target])
                if reason:
                    diagnostics += [Diagnostic(_site_name(s), reason) for s in sites]
                    continue
                untied += _merge_call_sites(editor, sites, call_ops[target])
                merged += len(sites)
        stats = {"merged": merged, "skipped": len(diagnostics), "untied": untied}
        if not merged:
            return PassResult(program, False, stats, tuple(diagnostics))
        editor.eliminate_dead_code()
        return PassResult(editor.finish(), True, stats, tuple(diagnostics))

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        # Activation sites (SSF, linear adapters, temporal shift) are folded by their own passes.
        mergeable = {*_ops_by_form("weight"), *(t for t, op in _ops_by_form("call").items() if op.weight_form)}
        left = sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target in mergeable)
        if left != result.stats["skipped"]:
            raise AssertionError(f"{left} sites left, {result.stats['skipped']} reported skipped")


def _fold_weight_sites(
    editor: ir.ProgramEditor, weight_ops: set[Any]
) -> tuple[dict[fx.Node, torch.Tensor], list[Diagnostic]]:
    """Evaluate every weight site whose operands are stored (or already folded) tensors."""
    folded: dict[fx.Node, torch.Tensor] = {}
    refused: list[Diagnostic] = []
    for node in editor.graph.nodes:
        if node.op != "call_function" or node.target not in weight_ops:
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


def _chain(node: fx.Node, folded: dict[fx.Node, torch.Tensor]):
    """The folded weight-site nodes from ``node`` back to the stored parameter."""
    while node in folded:
        yield node
        node = node.args[0]


def _root(node: fx.Node, folded: dict[fx.Node, torch.Tensor]) -> fx.Node:
    for site in _chain(node, folded):
        node = site.args[0]
    return node


def _key(node: Any) -> Any:
    """Structural identity of a chain: same op on the same placeholders and scalars."""
    if isinstance(node, fx.Node):
        if node.op == "placeholder":
            return node.name
        return (str(node.target), tuple(_key(a) for a in node.args))
    return node


def _groups(folded: dict[fx.Node, torch.Tensor]) -> list[list[fx.Node]]:
    """Folded chain ends (read by non-site nodes), grouped when they compute the same value."""
    ends = [n for n in folded if any(u not in folded for u in n.users)]
    groups: dict[Any, list[fx.Node]] = {}
    for node in ends:
        groups.setdefault(_key(node), []).append(node)
    return list(groups.values())


def _materialize(editor: ir.ProgramEditor, group: list[fx.Node], folded: dict[fx.Node, torch.Tensor]) -> int:
    """Put the folded value into a parameter and reroute the group's readers to it."""
    value = folded[group[0]]
    root = _root(group[0], folded)
    fqn = editor.fqn(root)
    chains = {site for end in group for site in _chain(end, folded)}
    others = [u for u in root.users if u not in chains and u not in folded]
    if others:
        target = editor.add_parameter(fresh_name(editor, f"{fqn}_merged"), value)
    else:
        editor.set_tensor(fqn, value)
        target = root
    for end in group:
        end.replace_all_uses_with(target)
    return int(bool(others))


def _call_refusal(editor: ir.ProgramEditor, weight: Any, sites: list[fx.Node], op: SiteOp) -> str | None:
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
    start = op.operands_start
    for arg in sites[0].args[start : start + len(op.tensor_roles)]:
        if isinstance(arg, fx.Node) and editor.tensor(arg) is None:
            return f"adapter tensor {arg.name} is computed in the graph, not stored"
    return None


def _merge_call_sites(editor: ir.ProgramEditor, sites: list[fx.Node], op: SiteOp) -> int:
    """Call sites of one linear module's weight → the plain base op on ``W'``, ``b'`` (the op's weight form)."""
    if op.base_params != ("weight", "bias") or op.weight_form is None:
        raise AssertionError(f"{op.name} is not a mergeable call site of a linear module")
    x_weight_bias, operands = sites[0].args[: op.operands_start], sites[0].args[op.operands_start :]
    _x, weight, bias = x_weight_bias
    fan_in_fan_out = dict(zip(op.scalars, operands[len(op.tensor_roles) :])).get("fan_in_fan_out", False)
    forms = op.weight_form(*operands)
    module = sites[0].meta.get(ir.meta.PEFTC, {}).get("module", _site_name(sites[0]))

    def evaluate(param: str, value: torch.Tensor) -> torch.Tensor:
        form, args = forms[param]
        return form.overload(value, *(editor.tensor(a) if isinstance(a, fx.Node) else a for a in args))

    merged_w = evaluate("weight", editor.tensor(weight))
    if not torch.isfinite(merged_w).all():
        adapter = sites[0].meta.get(ir.meta.PEFTC, {}).get("adapter", "?")
        raise InputError(
            f"adapter {adapter!r}: merged weight of {module!r} is not finite; the adapter tensors are broken"
        )
    weight_node, untied = _writable(editor, weight, sites, f"{module}.weight")
    editor.set_tensor(editor.fqn(weight_node), merged_w)
    bias_node = bias
    if "bias" in forms:
        if bias is None:  # a bias the base lacks: the update added to zeros
            zero = torch.zeros_like(editor.tensor(forms["bias"][1][0]), dtype=merged_w.dtype)
            bias_node = editor.add_parameter(fresh_name(editor, f"{module}.bias"), evaluate("bias", zero))
        else:
            bias_node, tied = _writable(editor, bias, sites, f"{module}.bias")
            untied += tied
            editor.set_tensor(editor.fqn(bias_node), evaluate("bias", editor.tensor(bias)))
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
    copy = editor.add_parameter(fresh_name(editor, f"{fqn}_merged"), editor.tensor(node))
    for site in sites:
        site.replace_input_with(node, copy)
    return copy, 1


def _site_name(node: fx.Node) -> str:
    return node.meta.get(ir.meta.PEFTC, {}).get("module") or ir.meta.module_path(node) or node.name
