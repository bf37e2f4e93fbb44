"""The stages every build mode shares: read the adapters, load and trace the model, parse the adapters
against it, and (for a stack of adapters) insert their sites: the reference program.

:class:`Stages` times each stage under the key the manifest reports it by and announces it to the
progress callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from peftc import ir
from peftc.loaders import LoadedModel, load_model
from peftc.methods.base import Adapter, ParseOptions
from peftc.methods.loading import read_adapter
from peftc.methods.registry import parse_adapter
from peftc.options import PathLike
from peftc.passes import pipelines
from peftc.passes.base import PassContext, PassManager, PassRecord

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
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

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
    names: tuple[str, ...] | None = None
    """The adapters' names (default: their directory or file names)."""
    workdir: str | None = None
    """Where ``pkg.module:factory`` modules are imported from (default: the working directory)."""


@dataclasses.dataclass(frozen=True)
class Built:
    """Everything a build derives before its mode optimizes: also what ``peftc verify`` rebuilds."""

    loaded: LoadedModel
    base: ir.Program
    adapters: tuple[Adapter, ...]
    reference: ir.Program | None
    """The base with every adapter's sites, stacked; None when the adapters are alternatives."""
    records: tuple[PassRecord, ...]


def build(sources: Sources, stages: Stages, *, stack: bool, dump_ir: Path | None = None) -> Built:
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
    model = sources.model
    with stages("load", f"load model {model if isinstance(model, str) else type(model).__name__}"):
        loaded = load_model(
            model, inputs=list(sources.inputs), allow_pickle=sources.allow_pickle, workdir=sources.workdir
        )
    with stages("trace", "trace: torch.export"):
        base = loaded.program
        if base is None:
            signature = loaded.signature
            base = ir.trace(loaded.module, signature.example(signature.trace_sizes()), signature.dynamic_shapes())
    with stages("adapters", "match adapters to the model"):
        table = ir.module_table(base)
        options = ParseOptions(base_residual=sources.base_residual, tied_embeddings=loaded.tied_embeddings)
        adapters = _unique_names([parse_adapter(source, table, options) for source in read])
    if not stack:  # alternatives (swappable): each adapter gets its own reference program when verified
        return Built(loaded, base, adapters, None, ())
    with stages("adapt", "adapt: insert adapter sites"):
        reference, records = PassManager(pipelines.adapt(adapters)).run(base, stages.context(dump_ir))
    return Built(loaded, base, adapters, reference, tuple(records))


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
