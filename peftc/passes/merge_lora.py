"""merge-lora: fold every ``peftc::lora_linear`` site into its base weight (``shared/methods.md`` §2.1).

For a site ``lora_linear(x, W, b, A, B, b_B, s, fan_in_fan_out)``::

    W' = W + s·B·A            (transposed for fan_in_fan_out, i.e. GPT-2 Conv1D)
    b' = b + s·b_B            (only with lora_bias)

computed in fp32 and cast back to ``W``'s dtype, then the site becomes the plain base op again:
``aten.linear(x, W', b')``, or ``aten.matmul(x, W') + b'`` for a ``[d_in, d_out]`` weight.

Cases:

1. A module called several times: all its sites share ``W`` and the adapter tensors; ``W'`` is
   computed once.
2. ``W`` also feeds nodes outside these sites (tied weights): ``W'`` becomes a new parameter for the
   sites only (``untied``), so the other users keep ``W``.
3. Refusals leave the site unmerged with a diagnostic: a base weight that is not floating point
   (quantized), a weight or adapter tensor computed in the graph rather than stored, or a tied
   weight adapted differently by two sites.
4. A non-finite merged weight is an error naming the adapter and module (the adapter is broken).

After the pass no ``peftc::lora_linear`` node remains except the refused ones.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from peftc import ir
from peftc.errors import InputError
from peftc.ops.lora import delta_weight
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult

LORA_LINEAR = torch.ops.peftc.lora_linear.default


@dataclasses.dataclass(frozen=True)
class MergeLoraOptions:
    compute_dtype: str = "float32"
    """dtype in which ``W + s·B·A`` is formed before casting back to the base dtype."""


class MergeLoraPass(PassBase):
    """Fold LoRA updates into the base weights."""

    name = "merge-lora"

    def __init__(self, options: MergeLoraOptions | None = None) -> None:
        self.options = options or MergeLoraOptions()

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in editor.graph.nodes:
            if node.op == "call_function" and node.target is LORA_LINEAR:
                groups.setdefault(node.args[1], []).append(node)
        merged = untied = 0
        diagnostics: list[Diagnostic] = []
        for weight, sites in groups.items():
            reason = self._refusal(editor, weight, sites)
            if reason:
                diagnostics += [Diagnostic(_site_name(s), reason) for s in sites]
                continue
            untied += self._merge(editor, weight, sites)
            merged += len(sites)
        if not merged:
            return PassResult(program, False, {"merged": 0, "skipped": len(diagnostics)}, tuple(diagnostics))
        stats = {"merged": merged, "skipped": len(diagnostics), "untied": untied}
        return PassResult(editor.finish(), True, stats, tuple(diagnostics))

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        left = ir.op_counts(program).get("peftc.lora_linear", 0)
        if left != result.stats.get("skipped", 0):
            raise AssertionError(f"{left} lora_linear sites left, {result.stats.get('skipped')} reported skipped")

    def _refusal(self, editor: ir.ProgramEditor, weight: fx.Node, sites: list[fx.Node]) -> str | None:
        w = editor.tensor(weight)
        if w is None:
            return f"the base weight is computed in the graph ({weight.name}), not a stored parameter"
        if not w.dtype.is_floating_point:
            return (
                f"the base weight is {str(w.dtype).removeprefix('torch.')}; merging into a quantized base "
                "is not supported: keep the site unmerged (--no-merge)"
            )
        adapter_args = {tuple(s.args[2:]) for s in sites}
        if len(adapter_args) > 1:
            return "one tied weight is adapted differently by several sites"
        for arg in sites[0].args[3:6]:
            if isinstance(arg, fx.Node) and editor.tensor(arg) is None:
                return f"adapter tensor {arg.name} is computed in the graph, not stored"
        return None

    def _merge(self, editor: ir.ProgramEditor, weight: fx.Node, sites: list[fx.Node]) -> int:
        _x, _w, bias, a, b, b_bias, scale, fan_in_fan_out = sites[0].args
        compute = getattr(torch, self.options.compute_dtype)
        w = editor.tensor(weight)
        merged_w = w.to(compute) + delta_weight(editor.tensor(a), editor.tensor(b), scale, fan_in_fan_out).to(compute)
        module = sites[0].meta.get(ir.meta.PEFTC, {}).get("module", _site_name(sites[0]))
        if not torch.isfinite(merged_w).all():
            adapter = sites[0].meta.get(ir.meta.PEFTC, {}).get("adapter", "?")
            raise InputError(
                f"adapter {adapter!r}: merged weight of {module!r} is not finite; the adapter tensors are broken"
            )
        untied = 0
        weight_node, tied = self._writable(editor, weight, sites, f"{module}.weight")
        untied += tied
        editor.set_tensor(editor.fqn(weight_node), merged_w.to(w.dtype))
        bias_node = bias
        if b_bias is not None:
            lora_bias = editor.tensor(b_bias).to(compute) * scale
            if bias is None:
                bias_node = editor.add_parameter(f"{module}.bias", lora_bias.to(w.dtype))
            else:
                bias_node, tied = self._writable(editor, bias, sites, f"{module}.bias")
                untied += tied
                base_bias = editor.tensor(bias)
                editor.set_tensor(editor.fqn(bias_node), (base_bias.to(compute) + lora_bias).to(base_bias.dtype))
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

    @staticmethod
    def _writable(editor: ir.ProgramEditor, node: fx.Node, sites: list[fx.Node], fqn: str) -> tuple[fx.Node, int]:
        """``node`` itself if only these sites use it, else a new parameter copy for them (untied)."""
        if set(node.users) <= set(sites):
            return node, 0
        if editor.has_state(fqn):
            fqn = f"{fqn}_untied"
        copy = editor.add_parameter(fqn, editor.tensor(node))
        for site in sites:
            site.replace_input_with(node, copy)
        return copy, 1


def _site_name(node: fx.Node) -> str:
    return node.meta.get(ir.meta.PEFTC, {}).get("module") or ir.meta.module_path(node) or node.name
