"""factor-dora: precompute DoRA's norm factor for artifacts that keep adapters unmerged.

Every ``dora_weight(W, A, B, m, s)`` site whose operands are stored tensors becomes
``dora_factored_weight(W, A, B, f, s)`` with ``f = m / ‖W + s·B·A‖`` evaluated here, in fp32, from
the same function the reference uses (``dora.py``). The artifact then keeps the base
weight and the adapter's ``A``, ``B`` and ``f`` as separate tensors and never computes a norm at run
time (PEFT's eager DoRA recomputes it on every call). ``f`` is a new parameter
``<module>.dora_factor.<adapter>`` annotated with where it came from; the magnitude vector is left
unused (``eliminate-dead-code`` drops it).

A site stacked on another adapter's site reads a computed weight, so its norm cannot be taken here;
it is left as it is, with a diagnostic (a backend that folds weight-only expressions still computes
it once per load).
"""

from __future__ import annotations

import dataclasses

import torch

from peftc import ir
from peftc.methods.lora.dora import DORA_FACTORED_WEIGHT, DORA_WEIGHT, factor
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class FactorDoraOptions:
    """No knobs: the factor is computed in fp32, as the reference computes it."""


class FactorDoraPass(PassBase):
    """Replace DoRA's per-call norm by a factor computed at compile time."""

    name = "factor-dora"

    def __init__(self) -> None:
        self.options = FactorDoraOptions()

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        diagnostics: list[Diagnostic] = []
        factored = 0
        for node in list(editor.graph.nodes):
            if node.op != "call_function" or node.target is not DORA_WEIGHT.overload:
                continue
            weight, lora_a, lora_b, magnitude, scale, layout = node.args
            tensors = [editor.tensor(n) for n in (weight, lora_a, lora_b, magnitude)]
            info = dict(node.meta.get(ir.meta.PEFTC, {}))
            if any(t is None for t in tensors):
                why = "its weight is another adapter's output (stacked): the norm is not a compile-time constant"
                diagnostics.append(Diagnostic(info.get("module", node.name), why))
                continue
            with torch.no_grad():
                value = factor(*tensors, scale, layout)
            fqn = editor.fqn(magnitude).replace(".magnitude.", ".dora_factor.", 1)
            source = magnitude.meta.get(ir.meta.PEFTC, {}).get("source", editor.fqn(magnitude))
            factor_node = editor.node_for(fqn) or editor.add_parameter(
                fqn, value, adapter=info.get("adapter"), source=f"{source} / ‖W + s·B·A‖", role="factor"
            )
            new = editor.call(
                DORA_FACTORED_WEIGHT.overload, (weight, lora_a, lora_b, factor_node, scale, layout), like=node
            )
            ir.meta.peftc_meta(new).update(
                {k: v for k, v in info.items() if k != "from_pass"}, site=DORA_FACTORED_WEIGHT.name
            )
            editor.replace(node, new)
            factored += 1
        stats = {"factored": factored, "skipped": len(diagnostics)}
        if not factored:
            return PassResult(program, False, stats, tuple(diagnostics))
        return PassResult(editor.finish(), True, stats, tuple(diagnostics))
