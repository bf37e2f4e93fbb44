"""eliminate-dead-code: drop nodes whose results nothing uses, then parameters nothing reads.

Run after passes that leave operands behind (merging leaves the adapter tensors unused; insertion
leaves the shape computations of the module calls it replaced). Side-effecting nodes (runtime
asserts) are kept, as FX's own dead-code elimination keeps them.
"""

from __future__ import annotations

from peftc import ir
from peftc.passes.base import PassBase, PassContext, PassResult


class EliminateDeadCodePass(PassBase):
    """Remove unused nodes and unused parameter/buffer/constant placeholders."""

    name = "eliminate-dead-code"

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        nodes = editor.eliminate_dead_code()
        state = editor.remove_unused_state()
        if not nodes and not state:
            return PassResult(program, False, {"nodes": 0, "state": 0})
        return PassResult(editor.finish(), True, {"nodes": nodes, "state": len(state)})
