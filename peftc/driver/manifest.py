"""The manifest of a compile: what went in, what ran, what came out, how it was checked.

:func:`target_record` is the manifest's ``target`` section, made right after lowering: verification
opens the artifact's runner from it, so a compile checks the very record ``peftc.load`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peftc import __version__, ir, machine
from peftc.artifact import SCHEMA_VERSION, Manifest, file_record
from peftc.backends.base import Backend
from peftc.driver.build import Built
from peftc.driver.modes import Lowering, Optimized
from peftc.options import CompileOptions
from peftc.verification import Report


def target_record(
    options: CompileOptions,
    optimized: Optimized,
    lowering: Lowering,
    directory: Path,
    precision: Mapping[str, Any],
    base: ir.Program | None = None,
) -> dict[str, Any]:
    """The ``target`` section: files with sha256, inputs, outputs, signature, the values each integer
    input may take (``index_ranges``: the rows of the embedding it indexes in ``base``, the traced base
    model; ``peftc/feeds.py`` checks them), precision, the machine it was built and verified on
    (``peftc.machine.cpu``), and the target's facts."""
    lowered = lowering.lowered
    ranges = ir.index_ranges(base) if base is not None else {}
    return {
        "name": options.target,
        "files": [file_record(directory / f, directory) for f in lowering.files],
        "inputs": list(lowered.inputs),
        "outputs": list(lowered.outputs),
        "signature": optimized.signature.to_json(),
        "index_ranges": {name: list(bounds) for name, bounds in sorted(ranges.items())},
        "verified_with": lowered.verify_with or options.target,
        "precision": dict(precision),
        "machine": machine.cpu(),
        **dict(lowered.info),
        **dict(lowering.target),
    }


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What a compile made before verification; the manifest describes it."""

    options: CompileOptions
    built: Built
    optimized: Optimized
    lowering: Lowering
    target: dict[str, Any]
    """The manifest's ``target`` record (:func:`target_record`): verification opens the runner from it."""
    model: dict[str, Any] = dataclasses.field(init=False)
    """The manifest's ``model`` record, made before verification: its digest reads every weight, which
    verification pages out while the artifact runs (``peftc/driver/deferred.py``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _describe_model(self.built))

    def runtime_adapters(self) -> list[dict[str, Any]]:
        """The adapters' manifest entries as far as the runtime reads them (name, the mode's fields)."""
        return [{"name": a.name, **self.lowering.adapters.get(a.name, {})} for a in self.built.adapters]

    def manifest(self, report: Report, timings: Mapping[str, float], backend: Backend) -> Manifest:
        """The whole manifest (``status`` from the report)."""
        options, built, optimized, lowering = self.options, self.built, self.optimized, self.lowering
        return Manifest(
            schema_version=SCHEMA_VERSION,
            status="ok" if report.passed else "failed",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            peftc_version=__version__,
            versions=_versions(backend),
            command=options.command(max_rank=optimized.options.get("max_rank")),
            workdir=os.getcwd(),
            options={
                "target": options.target,
                "target_options": options.target_json(),
                "merge": options.merge,
                "seed": options.seed,
                "oracle": options.oracle,
                "inputs": list(options.inputs),
                "base_residual": options.base_residual,
                "task_id": options.task_id,
                "precision": options.precision,
                "max_error": options.max_error,
                **({"task": built.loaded.task} if built.loaded.task else {}),
                **optimized.options,
            },
            model=self.model,
            adapters=[{**a.summary(), **lowering.adapters.get(a.name, {})} for a in _listed(built)],
            pipeline=[r.to_json() for r in [*built.world.records, *optimized.records]],
            target=self.target,
            verification=report.to_json(),
            not_run=[{"what": what, "reason": why} for what, why in (*lowering.lowered.not_run, *report.not_run)],
            timings={k: round(v, 3) for k, v in timings.items()},
            warnings=[w for a in built.adapters for w in a.all_warnings()],
        )


def _describe_model(built: Built) -> dict[str, Any]:
    loaded = built.loaded
    return {
        "spec": loaded.spec,
        "kind": loaded.kind,
        "class": loaded.class_name,
        "files": loaded.files,
        "state_sha256": ir.state_digest(built.world.base),
        "parameters": sum(t.numel() for t in built.world.base.state_dict.values()),
        **({"image_size": loaded.image_size} if loaded.image_size else {}),
    }


def _versions(backend: Backend) -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    versions.update(backend.versions())
    return versions


def _listed(built: Built) -> tuple[Any, ...]:
    """The adapters the manifest lists: those compiled in, and a generation prefix stored as the cache's head."""
    return (*built.adapters, *([built.head_adapter] if built.head_adapter is not None else []))
