"""Verification: run the artifact and its oracles on seeded inputs of several shapes and compare.

Every compile ends here; the report goes into the manifest, and a failure raises
:class:`~peftc.errors.VerificationError` carrying the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from peftc.loaders.inputs import InputSignature
from peftc.verification.compare import TOLERANCES, OutputError, Tolerance, compare, tolerance_for
from peftc.verification.oracles import Oracle, peft_oracle, program_oracle, to_numpy

ArtifactFn = Callable[[Mapping[str, torch.Tensor]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """One oracle on one input case."""

    oracle: str
    sizes: Mapping[str, int]
    seed: int
    outputs: tuple[OutputError, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


@dataclasses.dataclass(frozen=True)
class Report:
    """All comparisons of one artifact."""

    cases: tuple[CaseResult, ...]
    effect: Mapping[str, float]
    """Per output: ``max|y_adapted - y_base| / max|y_adapted|`` (how much the adapters change it)."""
    not_run: tuple[tuple[str, str], ...] = ()
    """``(what, why)`` for checks that did not run."""

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerances": {k: dataclasses.asdict(v) for k, v in TOLERANCES.items()},
            "adapter_effect": dict(self.effect),
            "cases": [
                {
                    "oracle": c.oracle,
                    "sizes": dict(c.sizes),
                    "seed": c.seed,
                    "outputs": [
                        {
                            "name": o.name,
                            "max_abs": o.max_abs,
                            "max_rel": o.max_rel,
                            "max_ref": o.max_ref,
                            "tol_abs": o.tolerance.abs,
                            "tol_rel": o.tolerance.rel,
                            "ok": o.ok,
                            **({"note": o.note} if o.note else {}),
                        }
                        for o in c.outputs
                    ],
                }
                for c in self.cases
            ],
        }


def verify(
    artifact: ArtifactFn,
    signature: InputSignature,
    oracles: Mapping[str, Oracle],
    *,
    base: Oracle | None = None,
    dtypes: Mapping[str, str] | None = None,
    seed: int = 0,
    cases: int = 3,
    not_run: Sequence[tuple[str, str]] = (),
) -> Report:
    """Compare ``artifact`` with every oracle on ``cases`` seeded input shapes."""
    results = []
    effect: dict[str, float] = {}
    for index, sizes in enumerate(signature.cases(cases)):
        inputs = signature.example(sizes, seed=seed + index)
        actual = artifact(inputs)
        reference = None
        for name, oracle in oracles.items():
            expected = oracle(inputs)
            reference = reference if reference is not None else expected
            results.append(CaseResult(name, sizes, seed + index, tuple(compare(expected, actual, dtypes))))
        if base is not None and reference is not None:
            for name, value in base(inputs).items():
                ref = reference.get(name)
                if ref is not None and ref.shape == value.shape and np.issubdtype(ref.dtype, np.floating):
                    scale = float(np.abs(ref).max()) or 1.0
                    change = float(np.abs(ref - value).max()) / scale
                    effect[name] = max(effect.get(name, 0.0), change)
    return Report(tuple(results), effect, tuple(not_run))


__all__ = [
    "CaseResult",
    "Oracle",
    "OutputError",
    "Report",
    "Tolerance",
    "compare",
    "peft_oracle",
    "program_oracle",
    "to_numpy",
    "tolerance_for",
    "verify",
]
