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

from peftc.errors import VerificationError
from peftc.loaders.inputs import InputSignature
from peftc.progress import advance
from peftc.verification.compare import TOLERANCES, OutputError, Tolerance, compare, tolerance_for
from peftc.verification.oracles import NotRun, Oracle, OraclePlan, module_oracle, peft_oracle, program_oracle, to_numpy

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

    def error(self) -> VerificationError:
        """The failure as an error: one line naming the worst output, and the whole table."""
        from peftc.report import verification_table

        case, out = max(((c, o) for c in self.cases for o in c.outputs if not o.ok), key=lambda pair: pair[1].max_rel)
        line = (
            f"verification failed: output {out.name!r} vs {case.oracle} at {dict(case.sizes)}: "
            f"max abs {out.max_abs:.3g}"
            + ("" if out.tolerance.abs is None else f" (tol {out.tolerance.abs:g})")
            + f", max rel {out.max_rel:.3g} (tol {out.tolerance.rel:g}){' — ' + out.note if out.note else ''}"
        )
        return VerificationError(line, verification_table(self.to_json()))

    @classmethod
    def combine(cls, reports: Sequence[Report], not_run: Sequence[tuple[str, str]] = ()) -> Report:
        """Several reports as one: every case, every adapter effect, and ``not_run``."""
        return cls(
            tuple(c for r in reports for c in r.cases),
            {k: v for r in reports for k, v in r.effect.items()},
            tuple(not_run),
        )

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


def output_dtypes(outputs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Each output's dtype as the artifact computes it (a TensorRT fp16 engine's ``compute_dtype``),
    which selects its tolerance."""
    return {o["name"]: o.get("compute_dtype") or o["dtype"] for o in outputs}


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
    tolerances: Mapping[str, Tolerance] | None = None,
) -> Report:
    """Compare ``artifact`` with every oracle on ``cases`` seeded input shapes.

    Every oracle runs on every case before the artifact runs at all: ``artifact`` may open the artifact
    at its first call, after the oracles' weights are paged out (``peftc.memory.page_out``), so the two
    copies of the weights are not resident together.

    ``tolerances``: oracle name → the tolerance of its comparisons (a reduced-precision budget);
    the others use each output's dtype's (``compare.py``).
    """
    effect: dict[str, float] = {}
    shapes = list(signature.cases(cases))
    expected = []
    for index, sizes in enumerate(shapes):
        advance(index, 2 * len(shapes))
        inputs = signature.example(sizes, seed=seed + index)
        outputs = {name: oracle(inputs) for name, oracle in oracles.items()}
        expected.append(outputs)
        reference = next(iter(outputs.values()), None)
        if base is not None and reference is not None:
            for name, value in base(inputs).items():
                ref = reference.get(name)
                if ref is not None and ref.shape == value.shape and np.issubdtype(ref.dtype, np.floating):
                    scale = float(np.abs(ref).max()) or 1.0
                    change = float(np.abs(ref - value).max()) / scale
                    effect[name] = max(effect.get(name, 0.0), change)
    results = []
    for index, (sizes, outputs) in enumerate(zip(shapes, expected, strict=True)):
        advance(len(shapes) + index, 2 * len(shapes))
        actual = artifact(signature.example(sizes, seed=seed + index))
        for name, want in outputs.items():
            tolerance = (tolerances or {}).get(name)
            results.append(CaseResult(name, sizes, seed + index, tuple(compare(want, actual, dtypes, tolerance))))
    advance(2 * len(shapes), 2 * len(shapes))
    return Report(tuple(results), effect, tuple(not_run))


__all__ = [
    "CaseResult",
    "NotRun",
    "Oracle",
    "OraclePlan",
    "OutputError",
    "Report",
    "Tolerance",
    "compare",
    "module_oracle",
    "output_dtypes",
    "peft_oracle",
    "program_oracle",
    "to_numpy",
    "tolerance_for",
    "verify",
]
