"""``peftc bench OUT [OUT...]``: what each artifact costs on this machine, next to what it replaces.

The base model and its adapters are rebuilt from the first artifact's manifest (as ``peftc verify``
does), giving two eager baselines: the base model (``eager base``) and PEFT's model
(``peft eager``, unmerged, fp32: what users run today). Every artifact and both baselines are timed
interleaved on the same seeded inputs: each repetition calls every path in a shuffled order, each
path twice with the second call timed, so drifting machine load hits all paths alike; a path's
speed-up is the median of its per-repetition ratios to PEFT eager. Each artifact's error is measured
on the same inputs against PEFT's fp32 output (the reference program's, where PEFT cannot load the
adapter), relative to each output's largest magnitude, next to the budget it was verified within.

Sizes come from the manifests (every file of the artifact). The machine's CPU and ISA flags are
printed with the numbers (``peftc.machine``). ``--plot FILE.png`` draws latency against error, one
point per artifact (matplotlib, ``pip install 'peftc[plot]'``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc import machine
from peftc.artifact import read_manifest
from peftc.driver.build import Stages, build
from peftc.driver.sources import recorded
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import DTYPES, InputSignature
from peftc.report import load_pyplot
from peftc.runtime import load
from peftc.verification import program_oracle
from peftc.verification.compare import relative_error
from peftc.verification.oracles import peft_oracle, to_numpy

PEFT, BASE = "peft eager", "eager base"
INPUT_BYTES = 1 << 30
"""The most bytes one timed call's inputs may take (``--batch``, ``--size``): its activations are many
times its inputs, and every path holds them, so a larger call would exhaust the memory of most machines."""


@dataclasses.dataclass(frozen=True)
class Timed:
    name: str
    call: Callable[[Mapping[str, torch.Tensor]], Mapping[str, np.ndarray]]
    facts: Mapping[str, Any]


def bench(
    artifacts: Sequence[Path],
    *,
    model: Any = None,
    batches: Sequence[int] = (1, 8),
    sizes: Mapping[str, int] | None = None,
    reps: int = 10,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time ``artifacts`` against the eager baselines; the result ``peftc bench --json`` prints.

    Args:
        model: the base model, if not the one the first artifact's manifest records (an in-memory
            model is not recorded).
        batches: the batch sizes to time (each clipped to the ``batch`` dim's range; inputs without a
            ``batch`` dim are timed once).
        sizes: sizes of the other dynamic dims (default: the verification's first case, e.g. seq).
        reps: interleaved repetitions per batch size.

    Raises:
        InputError: no artifact, an artifact that is not one, or a dim the inputs do not have.
    """
    say = progress or (lambda text: None)
    if not artifacts:
        raise InputError("peftc bench: give at least one artifact directory")
    manifests = [read_manifest(path) for path in artifacts]
    first = manifests[0]
    _check_sizes(artifacts[0], first, batches, sizes or {})
    stages = Stages(progress)
    sources = _timed_sources(first, model)
    built = build(sources, stages, stack=True, precision=lambda loaded: ("fp32", False))
    signature = built.loaded.signature.in_dtype(torch.float32)
    module = built.loaded.module
    if module is None:
        raise UnsupportedError("peftc bench: the base is an exported program; its eager baselines need the nn.Module")
    peft, why = peft_oracle(module, built.adapters)
    reference = peft or program_oracle(built.fp32.reference)

    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def eager(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return to_numpy(module(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}))

    paths = [Timed(BASE, eager, {}), *([Timed(PEFT, peft, {})] if peft else [])]
    paths += [_artifact_path(path, manifest) for path, manifest in zip(artifacts, manifests, strict=True)]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        paths = [dataclasses.replace(p, name=p.facts.get("path", p.name)) for p in paths]

    dims = signature.cases(1)[0] | dict(sizes or {})
    batch_dim = signature.dims.get("batch")
    if batch_dim is None:
        batches = [dims.get("batch", 1)]
    else:
        batches = sorted({min(max(b, batch_dim.min), batch_dim.max or b) for b in batches})
    rows: dict[str, dict[str, Any]] = {p.name: {"name": p.name, **p.facts, "batches": {}} for p in paths}
    for batch in batches:
        inputs = signature.example({**dims, "batch": batch} if batch_dim else dims, seed=seed)
        expected = reference(inputs)
        say(f"bench: batch {batch}, {len(paths)} paths x {reps} repetitions")
        times = _interleaved(paths, inputs, reps)
        for path in paths:
            rows[path.name]["batches"][str(batch)] = _record(times, path, expected, inputs)
    return {
        "machine": machine.cpu() | {"torch_threads": torch.get_num_threads()},
        "inputs": {"dims": dims, "batches": batches, "seed": seed, "reps": reps},
        "oracle": PEFT if peft else f"reference program ({why})",
        "paths": list(rows.values()),
    }


def _check_sizes(path: Path, manifest: Any, batches: Sequence[int], sizes: Mapping[str, int]) -> None:
    """``--size`` names dynamic dims within their bounds, and no call's inputs exceed :data:`INPUT_BYTES`
    (checked before the model is loaded or any input made)."""
    try:
        signature = InputSignature.from_json(manifest.target["signature"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: target.signature is missing or malformed ({type(e).__name__})") from e
    unknown = sorted(set(sizes) - set(signature.dims))
    if unknown:
        raise InputError(f"--size {unknown[0]}: the model's dynamic dims are {sorted(signature.dims)}")
    for name, size in sizes.items():
        spec = signature.dims[name]
        if size < spec.min or (spec.max is not None and size > spec.max):
            bounds = f"{spec.min}..{spec.max if spec.max is not None else ''}"
            raise InputError(f"--size {name}={size}: outside the sizes the artifact takes ({name} in {bounds})")
        if size % spec.multiple:
            raise InputError(f"--size {name}={size}: not a multiple of {spec.multiple}, as the artifact's {name} is")
    dims = signature.cases(1)[0] | dict(sizes)
    batch_dim = signature.dims.get("batch")
    batch = min(max(batches, default=1), batch_dim.max or max(batches)) if batch_dim else dims.get("batch", 1)
    dims["batch"] = batch
    for dim in signature.dims.values():
        if dim.sum_of:
            dims[dim.name] = sum(dims[part] for part in dim.sum_of)
    total = sum(
        math.prod(d if isinstance(d, int) else dims.get(d, 1) for d in spec.shape) * DTYPES[spec.dtype].itemsize
        for spec in signature.inputs
    )
    if total > INPUT_BYTES:
        given = [f"--batch {batch}"] + [f"--size {name}={size}" for name, size in sizes.items()]
        raise InputError(
            f"{' '.join(given)}: one call's inputs would take {total / 2**30:.3g} GiB, over peftc bench's bound of "
            f"{INPUT_BYTES / 2**30:g} GiB (a call's activations are many times that); give a smaller --batch or --size"
        )


def _timed_sources(first: Any, model: Any) -> Any:
    """The sources the first artifact records; a swappable artifact's default adapter is the one timed."""
    sources = recorded(first, model)
    if "slots" not in first.target:
        return sources
    keep = {first.target.get("default_adapter")}
    return dataclasses.replace(
        sources,
        adapters=tuple(p for p, a in zip(sources.adapters, first.adapters, strict=True) if a["name"] in keep),
        configs=tuple(c for c, a in zip(sources.configs, first.adapters, strict=True) if a["name"] in keep),
        names=tuple(n for n in sources.names if n in keep),
    )


def _artifact_path(path: Path, manifest: Any) -> Timed:
    precision = manifest.target.get("precision") or {"compute": "fp32"}
    facts = {
        "path": str(path),
        "target": manifest.target["name"],
        "precision": precision["compute"],
        "budget": precision.get("budget"),
        "merged": manifest.options.get("merge", True) and "slots" not in manifest.target,
        "swappable": "slots" in manifest.target,
        "bytes": sum(f["bytes"] for f in manifest.target["files"]),
    }
    return Timed(Path(path).name or str(path), _numpy(load(path)), facts)


def _record(times: Mapping[str, list[float]], path: Timed, expected: Any, inputs: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"ms": 1e3 * statistics.median(times[path.name])}
    if PEFT in times:
        ratios = [p / t for p, t in zip(times[PEFT], times[path.name], strict=True)]
        record["speedup_vs_peft"] = statistics.median(ratios)
    ratios = [t / b for t, b in zip(times[path.name], times[BASE], strict=True)]
    record["vs_base"] = statistics.median(ratios)
    record["error"] = relative_error(expected, path.call(inputs))
    return record


def _numpy(runner: Any) -> Callable[[Mapping[str, torch.Tensor]], dict[str, np.ndarray]]:
    def call(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in runner(**{k: v.numpy() for k, v in inputs.items()}).items()}

    return call


def _interleaved(paths: Sequence[Timed], inputs: Mapping[str, torch.Tensor], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    order = list(paths)
    shuffle = random.Random(0).shuffle
    for path in order:  # warm up: first calls allocate, compile kernels, fill caches
        path.call(inputs)
    for _ in range(reps):
        shuffle(order)
        for path in order:
            path.call(inputs)
            start = time.perf_counter()
            path.call(inputs)
            times[path.name].append(time.perf_counter() - start)
    return times


def report(result: Mapping[str, Any]) -> str:
    """The bench result as a table per batch size."""
    from peftc.report import table

    cpu = result["machine"]
    inputs = result["inputs"]
    dims = ", ".join(f"{k}={v}" for k, v in inputs["dims"].items() if k != "batch")
    lines = [
        f"{cpu['model']} ({cpu['cores']} CPUs, torch threads {cpu['torch_threads']}), ISA {' '.join(cpu['isa']) or '-'}",
        f"inputs {dims or '-'} (seed {inputs['seed']}), {inputs['reps']} interleaved repetitions; error vs {result['oracle']}",
    ]
    for batch in result["inputs"]["batches"]:
        rows = []
        for path in result["paths"]:
            record = path["batches"][str(batch)]
            rows.append(
                [
                    path["name"],
                    path.get("target", "eager"),
                    path.get("precision", "fp32"),
                    f"{path['bytes'] / 2**20:.1f}" if "bytes" in path else "-",
                    f"{record['ms']:.2f}",
                    f"{record['speedup_vs_peft']:.2f}x" if "speedup_vs_peft" in record else "-",
                    f"{record['vs_base']:.2f}x",
                    f"{record['error']:.2e}",
                    f"{path['budget']:.2e}" if path.get("budget") else "-",
                ]
            )
        headers = ["path", "target", "precision", "MiB", "ms", "PEFT / path", "path / base", "error", "budget"]
        lines += ["", f"batch {batch}", table(headers, rows)]
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Latency against error, one point per path and batch size, written as a PNG.

    Raises:
        UnsupportedError: matplotlib is not installed.
    """
    pyplot = load_pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    floor = 1e-8
    for batch, marker in zip(result["inputs"]["batches"], "os^Dv<>", strict=False):
        for index, timed in enumerate(result["paths"]):
            record = timed["batches"][str(batch)]
            color = f"C{index % 10}"
            axes.scatter(max(record["error"], floor), record["ms"], marker=marker, color=color)
            axes.annotate(
                f"{timed['name']} b{batch}", (max(record["error"], floor), record["ms"]), fontsize=7,
                xytext=(4, 2), textcoords="offset points",
            )  # fmt: skip
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(f"max error relative to output scale (vs {result['oracle']}; eager base/PEFT at {floor:g})")
    axes.set_ylabel("latency, ms (median)")
    cpu = result["machine"]
    axes.set_title(f"{cpu['model']}, {cpu['cores']} CPUs, {' '.join(cpu['isa'])}", fontsize=8)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as e:
        raise InputError(f"--plot {path}: cannot write it: {e.strerror or e}") from None
    finally:
        pyplot.close(figure)
