"""Verifying a swappable artifact: the base, every adapter, and mixed batches.

The runner is called with ``adapter=`` (``peftc/swap/runtime.py``). With no adapter it must be the
base model; with each adapter it must match that adapter's oracles (its eager reference program and
PEFT); with a bank, batches whose rows use the base and the adapters in turn must match the per-row
eager outputs, as many adapters per batch as the bank holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from peftc.loaders.inputs import DimSpec, InputSignature
from peftc.swap import storage
from peftc.swap.table import INDEX_INPUT, SlotTable
from peftc.verification import Oracle, Report, Tolerance, verify
from peftc.verification.compare import tolerance_for


def verify_artifact(
    runner: Any,
    signature: InputSignature,
    table: SlotTable,
    base: Oracle,
    references: Mapping[str, Mapping[str, Oracle]],
    *,
    dtypes: Mapping[str, str],
    seed: int,
    not_run: Sequence[tuple[str, str]] = (),
    tolerances: Mapping[str, Tolerance | None] | None = None,
) -> Report:
    """The base (no adapter) and every adapter (its named oracles), and mixed batches with a bank.

    ``tolerances``: oracle name as reported (``base``, ``peft[a]``, ``mixed batch``…) → its tolerance.
    """
    budgets = {k: v for k, v in (tolerances or {}).items() if v is not None}

    def run(adapter: Any) -> Callable[[Mapping[str, torch.Tensor]], Mapping[str, np.ndarray]]:
        return lambda inputs: runner.run({k: v.numpy() for k, v in inputs.items()}, adapter=adapter)

    plain = InputSignature(tuple(i for i in signature.inputs if i.name != INDEX_INPUT), signature.dims)
    reports = [verify(run(None), plain, {"base": base}, dtypes=dtypes, seed=seed, tolerances=budgets)]
    for name, oracles in references.items():
        named = {f"{o}[{name}]": fn for o, fn in oracles.items()}
        report = verify(run(name), plain, named, base=base, dtypes=dtypes, seed=seed, tolerances=budgets)
        reports.append(dataclasses.replace(report, effect={f"{name}: {k}": v for k, v in report.effect.items()}))
    if table.bank and references:
        names = list(references)
        for start in range(0, len(names), table.bank - 1):  # as many adapters per batch as the bank holds
            group = {n: references[n] for n in names[start : start + table.bank - 1]}
            reports.append(_verify_mixed(run, plain, base, group, dtypes, seed, budgets))
    return Report.combine(reports, not_run)


def _verify_mixed(
    run: Callable[[Any], Callable[[Mapping[str, torch.Tensor]], Mapping[str, np.ndarray]]],
    plain: InputSignature,
    base: Oracle,
    references: Mapping[str, Mapping[str, Oracle]],
    dtypes: Mapping[str, str],
    seed: int,
    tolerances: Mapping[str, Tolerance],
) -> Report:
    """One batch whose rows use the base and every adapter in turn, against per-row eager outputs."""
    names = [None, *references]
    choice = names * 2
    sizes = {**plain.cases(1)[0], "batch": len(choice)}
    first = {n: next(iter(o.values())) for n, o in references.items()}

    def expected(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        per = {n: (first[n] if n else base)(inputs) for n in names}
        return {out: np.stack([per[n][out][row] for row, n in enumerate(choice)]) for out in per[None]}

    fixed = InputSignature(plain.inputs, {k: DimSpec(k, sizes[k], sizes[k]) for k in plain.dims})
    return verify(
        run(choice), fixed, {"mixed batch": expected}, dtypes=dtypes, seed=seed, cases=1, tolerances=tolerances
    )


def widened(tolerance: Tolerance | None, table: SlotTable) -> Tolerance | None:
    """``tolerance`` (None: the fp32 bound) widened by the error fp16/int8 slot storage may add
    (``storage.budget``; relative to each output's scale), for the oracles of outputs with adapters.
    Unchanged for fp32 storage."""
    extra = storage.budget(table.slot_dtype, table.depth)
    if not extra:
        return tolerance
    return Tolerance(None, (tolerance or tolerance_for("float32")).rel + extra)
