"""Comparing outputs: per-output max absolute and relative error against a per-dtype tolerance.

The relative error is ``max|y - y_ref| / max|y_ref|`` (relative to the output's largest magnitude,
not element-wise, so values near zero do not dominate). An output passes when both the absolute and
the relative error are within tolerance.

Why these tolerances. fp32 carries a 2^-24 ≈ 6e-8 unit roundoff. A merged weight ``W + s·B·A`` and an
unmerged ``x Wᵀ + s·(x Aᵀ) Bᵀ`` round differently; a dot product over K terms accumulates error
≈ √K·u relative to its magnitude, i.e. ≈ 3e-6 for K = 3072, and layer norms keep the error relative
to the activations' scale. On the models in the test suite (6-layer MiniLM, GPT-2, LLaMA) the
observed errors are 1e-7–4e-6 relative. 1e-5 relative leaves headroom for deeper stacks while still
catching a wrong formula: a dropped LoRA scale or a transposed update changes real adapters' outputs
by 1e-2 or more. The 1e-4 absolute bound catches large errors on outputs with small ranges. Half
precisions have 2^-11 (fp16) and 2^-8 (bf16) unit roundoff, and the bounds scale with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    abs: float | None
    """None: no absolute bound (a reduced-precision budget is relative to each output's scale)."""
    rel: float


TOLERANCES = {
    "float32": Tolerance(abs=1e-4, rel=1e-5),
    "float64": Tolerance(abs=1e-10, rel=1e-12),
    "float16": Tolerance(abs=2e-2, rel=5e-3),
    "bfloat16": Tolerance(abs=1.5e-1, rel=4e-2),
}
EXACT = Tolerance(abs=0.0, rel=0.0)


def tolerance_for(dtype: str) -> Tolerance:
    """The tolerance for outputs of ``dtype`` (``float32``...); integer and bool outputs must match exactly."""
    return TOLERANCES.get(str(dtype).removeprefix("torch."), EXACT)


@dataclasses.dataclass(frozen=True)
class OutputError:
    """How far one output is from the reference."""

    name: str
    max_abs: float
    max_ref: float
    max_rel: float
    tolerance: Tolerance
    ok: bool
    note: str = ""


NONFINITE_REFERENCE = (
    "the oracle's own output holds NaN/Inf on these inputs: the base model (its weights or its arithmetic in "
    "this precision) computes non-finite values, whatever the adapter"
)


def compare(
    reference: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    dtypes: Mapping[str, str] | None = None,
    tolerance: Tolerance | None = None,
) -> list[OutputError]:
    """Compare every reference output with the same-named actual output.

    ``dtypes`` names each output's dtype in the compiled model (default: the reference array's),
    which selects the tolerance; bf16 outputs reach numpy as fp32, hence the override. A given
    ``tolerance`` (a reduced-precision budget) applies to every float output instead.
    """
    results = []
    for name, ref in reference.items():
        ref = np.asarray(ref)
        tol = tolerance_for((dtypes or {}).get(name, str(ref.dtype)))
        if tolerance is not None and tol != EXACT:
            tol = tolerance
        got = actual.get(name)
        if got is None:
            results.append(OutputError(name, float("inf"), 0.0, float("inf"), tol, False, "output missing"))
            continue
        got = np.asarray(got)
        if got.shape != ref.shape:
            note = f"shape {list(got.shape)} != reference {list(ref.shape)}"
            results.append(OutputError(name, float("inf"), 0.0, float("inf"), tol, False, note))
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_ref = float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0
        max_rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
        finite = bool(np.isfinite(got).all()) or not np.issubdtype(got.dtype, np.floating)
        ok = finite and (tol.abs is None or max_abs <= tol.abs) and max_rel <= tol.rel
        note = "" if finite else "non-finite values"
        if np.issubdtype(ref.dtype, np.floating) and not np.isfinite(ref).all():
            ok, note = False, NONFINITE_REFERENCE
        results.append(OutputError(name, max_abs, max_ref, max_rel, tol, ok, note))
    return results


def relative_error(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> float:
    """The largest error of any float output, relative to that output's largest magnitude in
    ``expected`` (1 where that is 0), as :func:`compare` measures it; inf for a missing or non-finite
    output. One number for a search or a benchmark row, where :func:`compare` gives a table."""
    worst = 0.0
    for name, ref in expected.items():
        ref = np.asarray(ref)
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        if name not in actual:
            return float("inf")
        diff = float(np.abs(np.asarray(actual[name], dtype=np.float64) - ref).max())
        if not np.isfinite(diff):
            return float("inf")
        worst = max(worst, diff / (float(np.abs(ref).max()) or 1.0))
    return worst
