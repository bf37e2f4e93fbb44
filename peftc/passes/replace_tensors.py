"""replace-tensors: swap in the full tensors an adapter ships for base parameters.

PEFT adapters carry whole tensors for ``modules_to_save`` modules (task heads, resized layers) and,
with ``bias: all``/``lora_only``, for trained biases. Each replaces the base parameter's value, cast
to the base dtype as PEFT's ``load_state_dict`` does. If the base parameter is shared with modules
outside the replaced one (tied weights), a ``modules_to_save`` module gets its own copy (``untied``)
and the other users keep the base value, which is what PEFT's ``ModulesToSaveWrapper`` computes;
tensors PEFT loads in place (saved embedding layers, trained biases) change for every reader.
"""

from __future__ import annotations

import dataclasses

from peftc import ir
from peftc.methods.base import Adapter
from peftc.passes.base import PassBase, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class ReplaceTensorsOptions:
    adapters: tuple[Adapter, ...]
    """Adapters whose replacements to apply, in stacking order (a later one wins)."""


class ReplaceTensorsPass(PassBase):
    """Apply ``modules_to_save`` and trained-bias tensors."""

    name = "replace-tensors"

    def __init__(self, adapters: tuple[Adapter, ...]) -> None:
        self.options = ReplaceTensorsOptions(tuple(adapters))

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        replacements = [r for a in self.options.adapters for r in a.replacements]
        if not replacements:
            return PassResult(program, False, {"replaced": 0})
        editor = ir.ProgramEditor(program, self.name)
        untied = 0
        for r in replacements:
            node = editor.node_for(r.param)
            base = editor.tensor(node)
            owner = r.param.rpartition(".")[0]
            outside = [u for u in node.users if r.untie and not _inside(ir.meta.module_path(u), owner)]
            if outside:
                copy = editor.add_parameter(f"{r.param}_untied", base)
                for user in [u for u in node.users if u not in outside]:
                    user.replace_input_with(node, copy)
                node, untied = copy, untied + 1
            editor.set_tensor(editor.fqn(node), r.tensor.tensor.to(base.dtype))
        stats = {"replaced": len(replacements), "untied": untied}
        return PassResult(editor.finish(), True, stats)


def _inside(path: str | None, owner: str) -> bool:
    return path is not None and (path == owner or path.startswith(owner + "."))
