"""Build modes: what a compile does after the shared stages, one class per kind of artifact.

A mode owns its pass list (from ``peftc/passes/pipelines.py``), its lowering extras, its
verification plan and its manifest fields. The driver calls, in order, :meth:`Mode.check` (can this
target build it?), :meth:`Mode.optimize`, :meth:`Mode.lower` and :meth:`Mode.verify`; ``peftc
verify`` calls :meth:`Mode.verify` again with the manifest's target record, so a mode verifies from
what the manifest holds. The modes are :class:`Merged` and :class:`Unmerged` (a stack of adapters,
verified against the stacked reference program and PEFT) and ``peftc.swap.mode.Swappable``
(alternative adapters in slots, filled at run time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from peftc import ir
from peftc.backends.base import Backend, Lowered, LowerRequest
from peftc.driver.build import Built, Progress
from peftc.loaders.inputs import InputSignature
from peftc.passes import pipelines
from peftc.passes.base import Pass, PassContext, PassManager, PassRecord
from peftc.passes.take_state import TakeStatePass
from peftc.precision import FLOATS
from peftc.quant import compiled as qlora
from peftc.verification import Oracle, OraclePlan, Report, module_oracle, output_dtypes, program_oracle, verify


@dataclasses.dataclass(frozen=True)
class Optimized:
    """The program a mode lowers, what its passes did, and the mode's own results."""

    program: ir.Program | None
    """None once lowered: the compile drops it (its merged weights) before verification."""
    records: tuple[PassRecord, ...]
    signature: InputSignature
    """The artifact's inputs (a mode may add some: the adapter index of a bank)."""
    options: Mapping[str, Any]
    """The mode's fields of the manifest's ``options`` (resolved values, e.g. the slot rank)."""
    state: Any = None
    """What the mode's ``lower`` needs beyond the program (the slot table)."""


@dataclasses.dataclass(frozen=True)
class Lowering:
    """What a mode wrote: the target's lowering plus the mode's own files and manifest fields."""

    lowered: Lowered
    files: tuple[str, ...]
    """Every file of the artifact, relative to its directory."""
    target: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The mode's fields of the manifest's ``target`` record."""
    adapters: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """Adapter name → the mode's fields of its manifest entry."""


class Mode(Protocol):
    """A kind of artifact (see the module docstring)."""

    stacks: ClassVar[bool]
    """The adapters form one stack with one reference program; False: they are alternatives."""
    label: str
    """What ``optimize`` does, for the progress line."""

    def check(self, backend: Backend) -> None: ...

    def optimize(self, built: Built, ctx: PassContext) -> Optimized: ...

    def lower(
        self, backend: Backend, optimized: Optimized, built: Built, directory: Path, progress: Progress
    ) -> Lowering: ...

    def verify(
        self, runner: Any, built: Built, target: Mapping[str, Any], plans: Sequence[OraclePlan], seed: int
    ) -> Report: ...


@dataclasses.dataclass(frozen=True)
class _Stack:
    """A stack of adapters on one model: every target builds it."""

    stacks: ClassVar[bool] = True
    label: ClassVar[str] = ""
    passes: ClassVar[Callable[[], list[Pass]]]
    embeddings: str = "none"
    """A quantized base's float embedding and head tables: ``none``, ``int8``, ``int4`` (``--quantize-embeddings``)."""
    dequantize: bool = False
    """Float weights for a quantized base's 4-bit layers (``--target trt``: ``peftc/quant/merge.py``)."""

    def check(self, backend: Backend) -> None:
        return None

    def quantized_policy(self) -> tuple[str, float | None]:
        """The merge policy of LoRA sites on a quantized base, and ``auto``'s per-site budget."""
        return "two-path", None

    def optimize(self, built: Built, ctx: PassContext) -> Optimized:
        programs = [world.reference for world in built.worlds]
        options: dict[str, Any] = {"stack": [a.name for a in built.adapters]}
        if not qlora.has_sites(built.adapters) and not (self.dequantize and qlora.has_packed(programs[-1])):
            program, records = in_each_world(built, programs, type(self).passes, ctx)
            return Optimized(program, records, signature(built), options)
        made: list[Any] = []

        def passes() -> list[Pass]:
            made[:] = qlora.passes(*self.quantized_policy(), self.embeddings, self.dequantize)
            return type(self).passes(made)

        program, records = in_each_world(built, programs, passes, ctx)
        options.update(merge_policy=self.quantized_policy()[0], quantize_embeddings=self.embeddings)
        return Optimized(program, records, signature(built), options, state=[r for p in made for r in p.sites])

    def lower(
        self, backend: Backend, optimized: Optimized, built: Built, directory: Path, progress: Progress
    ) -> Lowering:
        request = LowerRequest(optimized.program, optimized.signature, built.world.reference, precision=built.precision)
        lowered = backend.lower(request, directory, progress)
        return Lowering(lowered, lowered.files, target=qlora.target_fields(optimized.state))

    def verify(
        self, runner: Any, built: Built, target: Mapping[str, Any], plans: Sequence[OraclePlan], seed: int
    ) -> Report:
        """The artifact against the stacked reference program and PEFT in each precision, on three seeded
        input shapes (``plans``: the fp32 oracles, then the artifact's precision's)."""
        oracles, tolerances, not_run = {}, {}, []
        for world, plan in zip(built.worlds, plans, strict=True):
            found, missing = plan.oracles(program_oracle(world.reference), built.adapters)
            oracles.update(found)
            tolerances.update(plan.tolerances(found))
            tolerances.update(qlora.tolerances(target, found))
            not_run += [*plan.not_run(), *missing]
        return verify(
            lambda inputs: runner.run({k: v.numpy() for k, v in inputs.items()}),
            built.loaded.signature.in_dtype(torch.float32),
            oracles,
            base=base_oracle(built),
            dtypes=output_dtypes(target["outputs"]),
            seed=seed,
            not_run=not_run,
            tolerances=tolerances,
        )


def base_oracle(built: Built) -> Oracle:
    """The base model without adapters in fp32, for the adapters' effect: the traced base, or the
    untraced module where an inserted adapter's wrapper was traced around it."""
    world = built.fp32
    return module_oracle(world.module) if world.inserted and world.module is not None else program_oracle(world.base)


def signature(built: Built) -> InputSignature:
    """The artifact's inputs: the model's, float ones in the artifact's world's precision."""
    return built.loaded.signature.in_dtype(FLOATS[built.world.precision])


def in_each_world(
    built: Built, programs: Sequence[ir.Program], passes: Callable[[], list[Pass]], ctx: PassContext
) -> tuple[ir.Program, tuple[PassRecord, ...]]:
    """``passes`` on each world's program; the last world's result, with the fp32 world's state taken
    (``take-state``) when there are two: merges and folds computed in fp32 and cast once."""
    results = []
    for world, program in zip(built.worlds, programs, strict=True):
        history = [r.name for r in world.records]
        results.append(PassManager(passes()).run(program, ctx, history=history))
    program, records = results[-1]
    if len(results) > 1:
        program, taken = PassManager([TakeStatePass(results[0][0])]).run(
            program, ctx, history=[r.name for r in records]
        )
        records = [*records, *taken]
    return program, tuple(records)


@dataclasses.dataclass(frozen=True)
class Merged(_Stack):
    """Every site folded into the weights (``pipelines.merged``): the base model's cost."""

    label: ClassVar[str] = "merge"
    passes = staticmethod(pipelines.merged)
    merge_policy: str = "auto"
    max_error: float | None = None

    def quantized_policy(self) -> tuple[str, float | None]:
        """``--merge-policy`` and ``--max-error``."""
        return self.merge_policy, self.max_error


@dataclasses.dataclass(frozen=True)
class Unmerged(_Stack):
    """Sites kept as separate ops (``pipelines.unmerged``, ``--no-merge``)."""

    label: ClassVar[str] = "keep sites unmerged"
    passes = staticmethod(pipelines.unmerged)
