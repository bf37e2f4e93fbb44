"""The stages every build mode shares: read the adapters, load and trace the model, parse the adapters
against it, and (for a stack of adapters) insert their sites: the reference program.

The model is traced in fp32, the numbers' reference (oracles, merges); when the artifact computes in
another precision from a program traced in it (``Capabilities.precisions``), it is traced in that one
too: a :class:`World` each. :class:`Stages` times each stage under the key the manifest reports it by
and announces it to the progress callback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from peftc import ir, memory
from peftc.errors import UnsupportedError
from peftc.generation import prefix, prompt_head
from peftc.loaders import LoadedModel, causal, identity, load_model, seq2seq
from peftc.logs import quiet_imports
from peftc.methods.base import Adapter, AdapterSource, ParseOptions
from peftc.methods.common import classify_fields
from peftc.methods.loading import read_adapter
from peftc.methods.registry import insertion, parse_adapter, parsers, wraps_forward
from peftc.options import PathLike
from peftc.passes import pipelines
from peftc.passes.base import PassContext, PassManager, PassRecord
from peftc.precision import FLOATS
from peftc.progress import reporting

Progress = Callable[[str], None]


class Stages:
    """Stage timings (``adapters``, ``load``, ``trace``…, seconds) and progress lines."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.say: Progress = progress or (lambda message: None)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, message: str) -> Iterator[None]:
        """Announce ``message`` and add the time the block takes to ``key``."""
        self.say(message)
        start = time.perf_counter()
        try:
            with reporting(self.say):  # counted work inside the stage reaches the progress bar
                yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start
            memory.trim()  # what the stage freed is not kept in the process for the next one

    def context(self, dump_ir: Path | None = None) -> PassContext:
        """The pass context of this run (``--dump-ir`` directory, progress)."""
        return PassContext(dump_dir=dump_ir, progress=self.say)


@dataclasses.dataclass(frozen=True)
class Sources:
    """What a build reads: the base model, the adapters, and how to read them."""

    model: Any
    adapters: tuple[PathLike, ...]
    configs: tuple[PathLike | None, ...] = ()
    """One ``adapter_config.json`` (or None) per adapter, for adapters given as bare weight files."""
    inputs: tuple[str, ...] = ()
    allow_pickle: bool = False
    base_residual: bool = False
    task_id: int | None = None
    """The task a Poly adapter is merged for (``--task-id``); None keeps its router and ``task_ids`` input."""
    names: tuple[str, ...] | None = None
    """The adapters' names (default: their directory or file names)."""
    workdir: str | None = None
    """Where ``pkg.module:factory`` modules are imported from (default: the working directory)."""
    task: str | None = None
    """``text-generation`` (None: inferred from the model's ``config.architectures``)."""


@dataclasses.dataclass(frozen=True)
class World:
    """The model traced in one precision, with the adapters' sites inserted when they form a stack."""

    precision: str
    module: torch.nn.Module | None
    """The base module in this precision (None for an exported program)."""
    base: ir.Program
    """The program adapters' sites are inserted into: the base module traced, or the wrapper an
    inserted adapter (prompt learning) put around it."""
    reference: ir.Program | None
    records: tuple[PassRecord, ...]
    inserted: bool = False
    """``base`` is the base module inside an inserted adapter's wrapper (``Method.insert``)."""


@dataclasses.dataclass(frozen=True)
class Built:
    """Everything a build derives before its mode optimizes: also what ``peftc verify`` rebuilds."""

    loaded: LoadedModel
    adapters: tuple[Adapter, ...]
    worlds: tuple[World, ...]
    """The fp32 world first; then the artifact's precision, when it is traced in another one."""
    precision: str
    """What the artifact computes in."""
    head: dict[str, torch.Tensor] | None = None
    """A generation step's cache head, a prefix's or a prompt's (``peftc/generation/prefix.py``,
    ``prompt_head.py``): the adapter it came from is data beside the base model's step, not in its program."""
    head_adapter: Adapter | None = None
    """The adapter ``head`` was read from, without sites (the manifest lists it; PEFT checks the head with it)."""

    @property
    def fp32(self) -> World:
        """The model in fp32: the oracles, and the values of every merged or cast tensor."""
        return self.worlds[0]

    @property
    def world(self) -> World:
        """The model in the artifact's precision (the fp32 world, unless it is traced in another)."""
        return self.worlds[-1]


Precision = Callable[[LoadedModel], tuple[str, bool]]
"""The artifact's precision for a loaded model, and whether it is traced in it (else lowered from fp32)."""


def _task(sources: Sources, read: list) -> str | None:
    """The task the model is loaded for: an adapter inserted around the model's forward keeps that forward
    (a task is then inferred as none), and refuses an explicit generation task in one line; a ``CAUSAL_LM``
    prefix or prompt keeps the task (given or inferred): it becomes the head of the generation step's cache."""
    wrapper = wraps_forward(read, sources.task_id)
    if prefix.generating(read, sources.task_id) and sources.task in (None, causal.TEXT_GENERATION):
        return sources.task  # a causal LM generates with the prefix or prompt as its cache's head
    if wrapper is None or sources.task in (None, causal.NO_TASK):
        return causal.NO_TASK if wrapper else sources.task
    one_task = ", or with --task-id K (one task's prompt)" if wrapper == prompt_head.MULTITASK else ""
    raise UnsupportedError(
        f"--task {sources.task}: a {wrapper} adapter is inserted around the model's own forward (full-sequence "
        f"outputs, no KV cache); compile it without --task{one_task}"
    )


def build(
    sources: Sources, stages: Stages, *, stack: bool, dump_ir: Path | None = None, precision: Precision | None = None
) -> Built:
    """Read, load, trace and parse; with ``stack``, also insert the adapters' sites in order."""
    with stages("adapters", f"read {len(sources.adapters)} adapter(s)"):
        read = [
            read_adapter(
                path,
                name=sources.names[index] if sources.names else None,
                config=sources.configs[index] if sources.configs else None,
                allow_pickle=sources.allow_pickle,
            )
            for index, path in enumerate(sources.adapters)
        ]
    task = _task(sources, read)
    model = sources.model
    with stages("load", f"load model {model if isinstance(model, str) else type(model).__name__}"), quiet_imports():
        loaded = load_model(
            model,
            inputs=list(sources.inputs),
            allow_pickle=sources.allow_pickle,
            workdir=sources.workdir,
            task=task,
        )
    head_source = prefix.generating(read, sources.task_id) if loaded.task == causal.TEXT_GENERATION else None
    read, head = _prefix_head(read, loaded, stack, sources.task_id)
    recorded = _head_record(head_source, sources.task_id) if head is not None and head_source else None
    task_id = None if head_source is not None else sources.task_id  # a multitask head took it
    inserted = insertion(read, loaded.module, loaded.signature, task_id)
    if inserted is not None:
        if not stack:
            raise UnsupportedError(
                f"--swappable: adapter {read[0].name!r} ({read[0].config.get('peft_type')}) is inserted by wrapping "
                "the base model, so it has no slots; compile it without --swappable"
            )
        loaded = dataclasses.replace(loaded, signature=inserted.signature)
    chosen, traced = precision(loaded) if precision else ("fp32", False)
    names = ["fp32", chosen] if traced else ["fp32"]
    with stages("trace", "trace: torch.export" + (f" (fp32 and {chosen})" if traced else "")):
        traces = [_trace(loaded, name, inserted.wrap if inserted else None) for name in names]
    with stages("adapters", "match adapters to the model"):
        table = ir.module_table(traces[0][1])
        options = ParseOptions(
            base_residual=sources.base_residual, task_id=sources.task_id, tied_embeddings=loaded.tied_embeddings
        )
        if loaded.task in seq2seq.TASKS and not stack:  # slots only where outputs depend on them
            table = seq2seq.live_table(traces[0][1], table)
        runs = {m for m in table if table[m].calls}
        split = [seq2seq.split_keys(s, runs, loaded.module) if loaded.task in seq2seq.TASKS else (s, ()) for s in read]
        parsed = [parse_adapter(s, table, options) for s, _ in split]
        parsed = [
            dataclasses.replace(a, unused=(*a.unused, *moved)) for a, (_, moved) in zip(parsed, split, strict=True)
        ]
        adapters = identity.checked(_unique_names(parsed), loaded, stages.say)
    worlds = []
    for name, (module, base) in zip(names, traces, strict=True):
        if not stack:  # alternatives (swappable): each adapter gets its own reference program when verified
            worlds.append(World(name, module, base, None, ()))
            continue
        with stages("adapt", "adapt: insert adapter sites" + (f" ({name})" if traced else "")):
            reference, records = PassManager(pipelines.adapt(adapters)).run(base, stages.context(dump_ir))
        worlds.append(World(name, module, base, reference, tuple(records), inserted is not None))
    return Built(loaded, adapters, tuple(worlds), chosen, head, recorded)


def _head_record(source: AdapterSource, task_id: int | None) -> Adapter:
    """The adapter a cache head was read from, as the manifest lists it: no sites, its config's fields
    (checked as its parser checks them) and, for a multitask prompt, the task the head is for.

    Raises:
        UnsupportedError: a config field peftc refuses or does not know.
    """
    peft_type = str(source.config.get("peft_type"))
    method = parsers()[peft_type]
    honoured, ignored = classify_fields(source, peft_type, method.fields)
    ignored.pop("task_type", None)  # it selects the wiring (PEFT's model class)
    if peft_type == prompt_head.MULTITASK:
        honoured["task_id"] = task_id  # the task the head was computed for
    return Adapter(source.name, method.name, source, (), honoured=honoured, ignored=ignored)


def _prefix_head(
    read: list, loaded: LoadedModel, stack: bool, task_id: int | None
) -> tuple[list, dict[str, torch.Tensor] | None]:
    """A ``CAUSAL_LM`` prefix or prompt of a model loaded for generation becomes the cache's head (no
    adapter is left to parse); on a model loaded without a generation step it is inserted around the
    forward as before.

    Raises:
        UnsupportedError: such an adapter on a model loaded for another generation task.
    """
    source = prefix.generating(read, task_id)
    if source is None or loaded.task is None:
        return read, None
    if loaded.task != causal.TEXT_GENERATION:
        kind = source.config.get("peft_type")
        raise UnsupportedError(f"{source.config_path}: a CAUSAL_LM {kind} with --task {loaded.task}: not supported")
    if prefix.positions(source) == prefix.COLUMNS:
        return [], prompt_head.head(source, read, loaded.module, stack, task_id)
    specs = {i.name: i for i in loaded.signature.inputs}
    layers = sum(1 for name in specs if name.startswith("past_key_values_") and name.endswith("_key"))
    layout = [(int(specs[causal.key_name(i)].shape[1]), int(specs[causal.key_name(i)].shape[3])) for i in range(layers)]
    kind = str(getattr(getattr(loaded.module, "config", None), "model_type", ""))
    return [], prefix.head(source, read, layout, stack, kind)


def _trace(
    loaded: LoadedModel, precision: str, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
) -> tuple[torch.nn.Module | None, ir.Program]:
    """The base module in ``precision`` (a copy unless it already is) and its program: of the module
    itself, or of ``wrap`` around it (an inserted adapter's wrapper)."""
    if loaded.program is not None:
        if loaded.precision != precision:
            raise UnsupportedError(
                f"the base is an exported program in {loaded.precision}; peftc cannot trace it again in {precision} "
                "(give the nn.Module, or export it in fp32)"
            )
        return None, loaded.program
    module = in_precision(loaded.module, precision)
    signature = loaded.signature.in_dtype(FLOATS[precision])
    example, dims = signature.example(signature.trace_sizes()), signature.dynamic_shapes()
    if wrap is None:
        return module, ir.trace(module, example, dims)
    # A prompt makes the model's sequence n + seq; torch cannot prove some stride guards on such sums
    # (min(8·(seq+n), 16·(seq+n)) in LLaMA's attention), so they are kept as runtime asserts.
    return module, ir.trace(wrap(module), example, dims, runtime_asserts=True)


def in_precision(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``module`` itself if its float tensors are all in ``precision``, else a copy in it.

    Rotary embeddings' ``inv_freq`` buffers stay fp32 (:data:`FP32_BUFFERS`): transformers computes
    the rotation angles ``position · inv_freq`` from them in fp32 and keeps them fp32 when it loads a
    bf16/fp16 checkpoint; rounded to bf16 (``2^-8`` relative) the angle at position 500 is off by up
    to ~2 radians, which no later precision recovers.
    """
    dtype = FLOATS[precision]
    floats = [t for n, t in (*module.named_parameters(), *_rounded_buffers(module)) if t.is_floating_point()]
    if all(t.dtype == dtype for t in floats):
        return module
    copied = copy.deepcopy(module)
    kept = {name: buffer.clone() for name, buffer in copied.named_buffers() if _keeps_fp32(name)}
    copied.to(dtype)
    for name, buffer in kept.items():
        owner, _, leaf = name.rpartition(".")
        setattr(copied.get_submodule(owner), leaf, buffer)
    return copied


FP32_BUFFERS = ("inv_freq", "original_inv_freq")
"""Buffer names (the last part) :func:`in_precision` leaves in their own dtype."""


def _keeps_fp32(name: str) -> bool:
    return name.rpartition(".")[2] in FP32_BUFFERS


def _rounded_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, b) for n, b in module.named_buffers() if not _keeps_fp32(n)]


def adapted(base: ir.Program, adapters: Sequence[Adapter]) -> ir.Program:
    """``base`` with ``adapters``' sites inserted (the reference program of that stack)."""
    return PassManager(pipelines.adapt(adapters)).run(base, PassContext())[0]


def _unique_names(adapters: list[Adapter]) -> tuple[Adapter, ...]:
    """Adapters named alike get ``_2``, ``_3``… in order."""
    seen: dict[str, int] = {}
    for index, adapter in enumerate(adapters):
        count = seen.get(adapter.name, 0)
        seen[adapter.name] = count + 1
        if count:
            adapters[index] = dataclasses.replace(adapter, name=f"{adapter.name}_{count + 1}")
    return tuple(adapters)
