"""peftc's IR: ``torch.export.ExportedProgram`` plus ``peftc::`` site ops.

This package is the only place that touches torch.export internals (graph signatures, lifted
placeholders, fake values). Passes use :class:`ProgramEditor` and the helpers re-exported here.
"""

from peftc.ir.canon import fingerprint, op_counts, target_name, text
from peftc.ir.modules import ModuleCall, ModuleInfo, ModuleTable, module_table, module_table_from_module
from peftc.ir.program import (
    Program,
    ProgramEditor,
    flatten_named,
    index_ranges,
    output_names,
    placeholder_fqn,
    state_digest,
    state_tensor,
    trace,
    user_input_names,
    validate,
)
from peftc.ir.serialize import load_program, save_program

__all__ = [
    "ModuleCall",
    "ModuleInfo",
    "ModuleTable",
    "Program",
    "ProgramEditor",
    "fingerprint",
    "flatten_named",
    "index_ranges",
    "load_program",
    "module_table",
    "module_table_from_module",
    "op_counts",
    "output_names",
    "placeholder_fqn",
    "save_program",
    "state_digest",
    "state_tensor",
    "target_name",
    "text",
    "trace",
    "user_input_names",
    "validate",
]
