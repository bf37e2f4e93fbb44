"""take-state: every parameter and buffer takes the value another program computed for it.

A reduced-precision artifact is traced in its precision (so the model's own dtype logic, such as a
softmax or a norm kept in fp32, is what it runs) but its tensors come from the fp32 program after the
same passes: merges and folds computed in fp32 from the original weights, cast once to each tensor's
dtype here (``peftc/precision.py``). Lifted constants stay the traced program's own (a mask's
``finfo(dtype).min`` must be the program's dtype's). The two programs have the same state keys and
shapes, because they are the same model with the same passes; a key the source lacks is left alone
and reported.
"""

from __future__ import annotations

import dataclasses

from peftc import ir
from peftc.errors import PassError
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class TakeStateOptions:
    source: ir.Program
    """The program whose parameters and buffers are taken (cast to this program's dtypes)."""


class TakeStatePass(PassBase):
    """Replace every parameter and buffer by the source program's, cast to its dtype."""

    name = "take-state"

    def __init__(self, source: ir.Program) -> None:
        self.options = TakeStateOptions(source)

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        source = self.options.source.state_dict
        editor = ir.ProgramEditor(program, self.name)
        taken, missing = 0, []
        for key, tensor in program.state_dict.items():
            value = source.get(key)
            if value is None or not tensor.is_floating_point():
                missing += [key] if value is None else []
                continue
            if tuple(value.shape) != tuple(tensor.shape):
                raise PassError(f"{key}: shape {list(value.shape)} in the fp32 program, {list(tensor.shape)} here")
            editor.set_tensor(key, value.detach().to(tensor.dtype))
            taken += 1
        notes = tuple(Diagnostic(key, "not in the fp32 program: kept as traced", "warning") for key in missing)
        if not taken:
            return PassResult(program, False, {"taken": 0, "kept": len(missing)}, notes)
        return PassResult(editor.finish(), True, {"taken": taken, "kept": len(missing)}, notes)
