"""``peftc combine``: load the base, parse the adapters against it, combine their task vectors tensor by
tensor, write the result (``peftc/combine/output.py``) and report.

The output format follows the result: a PEFT LoRA directory when it is low-rank (``cat``, exact; ``svd``,
truncated with the error reported per tensor) and every combined tensor is the weight (or the bias)
of a linear module; otherwise peftc's full-ΔW adapter, since a trimmed, sign-elected or rescaled sum
of task vectors has no low-rank form (and ``cat``/``svd`` of, say, an embedding update is then written
exactly as its ΔW).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from peftc.combine import lowrank, merge, sequential
from peftc.combine.deltas import TaskVectors
from peftc.combine.options import LOW_RANK, CombineOptions
from peftc.combine.output import DeltaOutput, Destination, LoraOutput
from peftc.combine.report import CombineReport, Row
from peftc.methods.base import Adapter, ParseOptions

Progress = Callable[[str], None]


def combine(
    model: Any,
    adapters: Sequence[Any],
    options: CombineOptions,
    out: Any,
    *,
    configs: Sequence[Any] = (),
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> CombineReport:
    """Combine ``adapters`` of ``model`` into a new adapter directory ``out``.

    Args:
        model: the base model (what ``peftc compile`` takes: a directory, ``pkg.module:factory``, a module…).
        adapters: adapter directories or weight files, in order.
        options: the method and its parameters.
        out: the directory to create.
        configs: an ``adapter_config.json`` (or None) per adapter given as a bare weights file.
        allow_pickle: accept pickled adapter weights (``weights_only=True``).
        progress: called with one line per stage.

    Raises:
        InputError: bad options, adapters of different bases, unreadable adapters, an existing ``out``.
        UnsupportedError: an adapter with no weight delta (an activation transform).
    """
    say = progress or (lambda message: None)
    start = time.perf_counter()
    options = options.checked_for(len(adapters))
    destination = Destination(out, _local(model, adapters, configs))  # checked before any work
    try:
        say(f"load model and {len(adapters)} adapter(s)")
        tv = task_vectors(model, adapters, configs=configs, allow_pickle=allow_pickle)
        say(f"combine: {options.method}")
        report = write(tv, options, destination.tmp, str(out))
        report = _timed(report, time.perf_counter() - start)
        destination.commit(report.to_json())
        return report
    finally:
        destination.abort()


def _local(model: Any, adapters: Sequence[Any], configs: Sequence[Any]) -> list[Path]:
    """The local files and directories a combine reads, which its output must not be or hold."""
    given = [model, *adapters, *configs]
    return [Path(p) for p in given if isinstance(p, (str, os.PathLike)) and os.path.lexists(p)]


def task_vectors(
    model: Any, adapters: Sequence[Any], *, configs: Sequence[Any] = (), allow_pickle: bool = False
) -> TaskVectors:
    """The base (not traced: its module table is read from the module) and the parsed adapters."""
    from peftc import ir
    from peftc.loaders import identity, load_model
    from peftc.logs import quiet_imports
    from peftc.methods.loading import read_adapter
    from peftc.methods.registry import parse_adapter

    with quiet_imports():
        loaded = load_model(model, allow_pickle=allow_pickle)
    if loaded.module is not None:
        table = ir.module_table_from_module(loaded.module)
    else:
        table = ir.module_table(loaded.program)
    parse_options = ParseOptions(tied_embeddings=loaded.tied_embeddings)
    parsed: list[Adapter] = []
    for index, path in enumerate(adapters):
        config = configs[index] if index < len(configs) else None
        source = read_adapter(path, config=config, allow_pickle=allow_pickle)
        parsed.append(parse_adapter(source, table, parse_options))
    identity.checked(parsed, loaded, lambda message: None)
    return TaskVectors(table, parsed)


def write(tv: TaskVectors, options: CombineOptions, directory: Path, out: str) -> CombineReport:
    """Combine ``tv`` by ``options`` (weights filled in) into ``directory``; the report names ``out``."""
    base_model = next(
        (
            a.source.config.get("base_model_name_or_path")
            for a in tv.adapters
            if a.source.config.get("base_model_name_or_path")
        ),
        None,
    )
    lora_why = _lora_refusal(tv)
    if options.method in LOW_RANK and lora_why is None:
        rows = _write_low_rank(tv, options, directory, base_model)
        fmt, why = "lora", f"{options.method} is low-rank and every combined tensor is a linear weight or bias"
    else:
        output = DeltaOutput(directory, {key: tuple(tv.modules.tensors[key].shape) for key in tv.keys}, base_model)
        try:
            rows = _write_deltas(tv, options, output)
        finally:
            output.close()
        fmt = "delta"
        why = lora_why if options.method in LOW_RANK else f"{options.method} is not low-rank: full ΔW per tensor"
    inputs = tuple(
        {"name": a.name, "path": str(a.source.path.resolve()), "method": a.method, "sha256": dict(a.source.sha256)}
        for a in tv.adapters
    )
    return CombineReport(out, fmt, why, options.method, options.record(), inputs, tuple(rows), 0.0)


def _lora_refusal(tv: TaskVectors) -> str | None:
    """Why the result cannot be a PEFT LoRA directory (None: it can)."""
    weights = {key.rpartition(".")[0] for key in tv.keys if tv.layout(key)}
    for key in tv.keys:
        owner, _, local = key.rpartition(".")
        if tv.layout(key) is None and not (local == "bias" and owner in weights):
            return f"{key} is not the weight or bias of a linear module: written as full ΔW"
    return None


def _write_low_rank(tv: TaskVectors, options: CombineOptions, directory: Path, base_model: str | None) -> list[Row]:
    output = LoraOutput()
    weights = options.weights or ()
    rank = options.rank or max(tv.ranks(), default=0) or None
    rows = []
    for key in tv.keys:
        owner = key.rpartition(".")[0]
        layout = tv.layout(key)
        taus = tv.deltas(key)
        norms = _norms(taus)
        if layout is None:  # the bias of a linear module: the exact weighted sum
            delta = sum(w * t for w, t in zip(weights, taus, strict=True)) * options.scale
            output.add_bias(owner, delta)
            rows.append(Row(key, 0.0, 0, float(delta.norm()), norms))
            continue
        if options.method == "cat":
            b, a = lowrank.cat(tv, key, weights, layout)
            a, error = a * options.scale, 0.0
        else:
            if rank is None:
                raise_no_rank()
            b, a, error = _svd(tv, key, weights, layout, rank, taus)
            a = a * options.scale
        output.add_weight(owner, b, a, layout)
        rows.append(Row(key, 0.0, 0, float((b @ a).norm()), norms, int(a.shape[0]), error))
    output.write(directory, base_model)
    return rows


def _svd(tv: TaskVectors, key: str, weights, layout: str, rank: int, taus) -> tuple[torch.Tensor, torch.Tensor, float]:
    """svd of ``Σ w_i ΔW_i`` on one linear weight: through the concatenated factors when thinner."""
    factored = all(tv.factors(i, key) is not None for i in range(len(weights)) if key in tv.changes[i])
    if factored:
        b, a = lowrank.cat(tv, key, weights, layout)
        if b.shape[1] < min(b.shape[0], a.shape[1]):
            return lowrank.svd_of_factors(b, a, rank)
    summed = sum(w * t for w, t in zip(weights, taus, strict=True))
    return lowrank.svd(summed if layout == "linear" else summed.T, rank)


def raise_no_rank() -> None:
    """svd of adapters none of which is a LoRA product needs ``--rank``."""
    from peftc.errors import InputError

    raise InputError("svd: no input is a LoRA adapter to take the rank from; give --rank")


def _write_deltas(tv: TaskVectors, options: CombineOptions, output: DeltaOutput) -> list[Row]:
    rows: list[Row] = []
    weights = options.weights or ()

    def emit(key: str, tau: torch.Tensor, norms: tuple[float, ...], stats: merge.TensorStats | None = None) -> None:
        tau = tau * options.scale
        output.add(key, tau)
        trimmed, conflicts = (stats.trimmed, stats.conflicts) if stats else (0.0, 0)
        rows.append(Row(key, trimmed, conflicts, float(tau.norm()), norms))

    if options.method == "lines":
        sequential.lines(tv, weights, options.alpha, options.beta, emit)
    elif options.method == "opcm":
        alpha = 0.5 if options.alpha is None else options.alpha
        merged, norms = sequential.opcm(tv, weights, options.order or (), alpha)
        for key in tv.keys:
            emit(key, merged.pop(key), norms[key])
    elif options.method in LOW_RANK:  # cat/svd of tensors LoRA cannot hold: the exact sum
        for key in tv.keys:
            taus = tv.deltas(key)
            emit(key, sum(w * t for w, t in zip(weights, taus, strict=True)), _norms(taus))
    else:
        for key in tv.keys:
            tau, stats = merge.combine_tensor(tv.deltas(key), options, key)
            emit(key, tau, stats.input_norms, stats)
    return rows


def _norms(taus: Sequence[torch.Tensor]) -> tuple[float, ...]:
    return tuple(float(t.norm()) for t in taus)


def _timed(report: CombineReport, seconds: float) -> CombineReport:
    import dataclasses

    return dataclasses.replace(report, seconds=seconds)
