"""The swappable build mode: compile once, then add, remove and switch adapters without recompiling.

``peftc compile … --swappable`` puts a zero *slot* on every LoRA, S²FT or sparse-ΔW site of the
adapters it is given (``slots.py``, ``ops.py``), lowers the program with the slot tensors overridable
(a ``SlotBackend``), and writes every given adapter as an adapter file (``files.py``). The zero
slots are the base model; an adapter file fills them. ``--multi-adapter N`` stacks ``N`` slots (row 0
the base) into banks read per batch row through an ``adapter_index`` input. The adapters are
alternatives, not a stack.

Verification (``verify.py``) covers the base against the eager base program and every adapter
against its own eager reference program and PEFT; with a bank, mixed batches too. ``--slot-dtype
fp16|int8`` stores the files smaller (``storage.py``); the adapters are then verified within the
budget of that format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from peftc.backends.base import Backend, LowerRequest, SlotBackend
from peftc.driver.build import Built, Progress, adapted
from peftc.driver.modes import Lowering, Optimized, in_each_world, signature
from peftc.errors import UnsupportedError
from peftc.loaders import seq2seq
from peftc.loaders.inputs import InputSignature, TensorInput
from peftc.passes import pipelines
from peftc.passes.base import PassContext
from peftc.precision import matmul_depth
from peftc.swap import slots
from peftc.swap.files import write_adapter_files
from peftc.swap.ops import SLOTS
from peftc.swap.table import INDEX_INPUT, SlotTable
from peftc.swap.verify import verify_artifact, widened
from peftc.verification import OraclePlan, Report, output_dtypes, program_oracle

SLOT_OPS = tuple(op.name for op in SLOTS.ops)
"""The slot ops' names, whose count on the longest path scales the slot storage budget."""


@dataclasses.dataclass(frozen=True)
class Swappable:
    """LoRA sites as fixed-shape slots filled from adapter files at run time (see the module docstring)."""

    max_rank: int | None = None
    """Slot rank; default: the largest rank of the given adapters."""
    bank: int = 0
    """``--multi-adapter N``: adapters one call can mix (the bank holds N + 1 slots with the base)."""
    capacity: int | None = None
    """``--slot-capacity K``: rows/columns (entries) every S²FT (sparse) slot holds; default: per module,
    the most a given adapter updates."""
    slot_dtype: str = "fp32"
    """``--slot-dtype``: how adapter files store slot values (``storage.py``)."""
    stacks: ClassVar[bool] = False
    label: ClassVar[str] = "adapter slots"

    def check(self, backend: Backend) -> None:
        if not isinstance(backend, SlotBackend):
            raise UnsupportedError(
                f"target {backend.name!r} cannot build --swappable artifacts; use --target onnx or aoti"
            )

    def optimize(self, built: Built, ctx: PassContext) -> Optimized:
        if built.loaded.task in seq2seq.TASKS and not any(a.sites for a in built.adapters):
            program = "encoder program" if built.loaded.task == seq2seq.ENCODER else "decoder step"
            raise UnsupportedError(
                f"--swappable with --task {seq2seq.TEXT2TEXT}: no given adapter adapts a module the {program} "
                "runs, so it would have no slot; give one that does, or compile without --swappable"
            )
        table = slots.plan(built.adapters, self.max_rank, self.bank + 1 if self.bank else 0, self.capacity)
        bases = [world.base for world in built.worlds]
        program, records = in_each_world(built, bases, lambda: pipelines.swappable(slots.slot_adapter(table)), ctx)
        table = dataclasses.replace(table, slot_dtype=self.slot_dtype, depth=matmul_depth(program, SLOT_OPS))
        options = {"swappable": True, "max_rank": table.rank, "multi_adapter": self.bank}
        options |= {"slot_capacity": self.capacity} if self.capacity is not None else {}
        options |= {"slot_dtype": self.slot_dtype} if self.slot_dtype != "fp32" else {}
        return Optimized(program, records, with_index(signature(built), table), options, table)

    def lower(
        self, backend: Backend, optimized: Optimized, built: Built, directory: Path, progress: Progress
    ) -> Lowering:
        table: SlotTable = optimized.state
        request = LowerRequest(optimized.program, optimized.signature, overridable=tuple(table.tensors()))
        lowered = backend.lower(request, directory, progress)
        files = write_adapter_files(backend, directory, table, built.adapters)
        target = {"slots": table.to_json(), "default_adapter": built.adapters[0].name}
        entries = {name: {"slot_file": path} for name, path in files.items()}
        return Lowering(lowered, (*lowered.files, *files.values()), target, entries)

    def verify(
        self, runner: Any, built: Built, target: Mapping[str, Any], plans: Sequence[OraclePlan], seed: int
    ) -> Report:
        """The base, and every adapter against its own reference program and PEFT in each precision
        (``plans``), within its budget widened by the slot storage's; mixed batches with a bank."""
        references: dict[str, dict[str, Any]] = {}
        tolerances, not_run = {}, []
        table = SlotTable.from_json(target["slots"])
        for world, plan in zip(built.worlds, plans, strict=True):
            budget = widened(plan.tolerance, table)  # the error fp16/int8 slot files may add
            for adapter in built.adapters:
                found, missing = plan.oracles(program_oracle(adapted(world.base, [adapter])), [adapter])
                references.setdefault(adapter.name, {}).update(found)
                tolerances.update({f"{name}[{adapter.name}]": budget for name in found} if budget else {})
                not_run += [(f"{what} [{adapter.name}]", why) for what, why in missing]
            not_run += plan.not_run()
        return verify_artifact(
            runner,
            InputSignature.from_json(target["signature"]).in_dtype(torch.float32),
            table,
            program_oracle(built.fp32.base),
            references,
            dtypes=output_dtypes(target["outputs"]),
            seed=seed,
            not_run=not_run,
            tolerances={"base": plans[0].tolerance, "mixed batch": widened(plans[0].tolerance, table), **tolerances},
        )


def with_index(base: InputSignature, table: SlotTable) -> InputSignature:
    """The artifact's inputs: the base's, plus ``adapter_index`` ``[batch]`` with a bank.

    Raises:
        UnsupportedError: a bank, but the model's inputs have no ``batch`` dim.
    """
    if not table.bank:
        return base
    if "batch" not in base.dims:
        raise UnsupportedError("--multi-adapter needs a 'batch' dim in the model's inputs (describe it with --input)")
    index = TensorInput(INDEX_INPUT, ("batch",), "int64", "index", 0, table.bank)
    return InputSignature((*base.inputs, index), base.dims)
