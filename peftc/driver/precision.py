"""Choosing what an artifact computes in, and how close it must come to the fp32 answer.

``--precision`` defaults to the base checkpoint's dtype where the target computes in it, else fp32
(noted in the manifest). A target computes a precision either from a program traced in it (the
driver traces the model in that precision too: ``build.World``) or from an fp32 program it casts when
it lowers (TensorRT's strongly typed networks). A reduced-precision artifact is verified against the
fp32 oracles within its budget (``--max-error``, default ``peftc.precision.budget``), and against
the oracles of its own precision within twice that (both are within the budget of the exact answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftc.backends.base import Backend
from peftc.driver.build import Built
from peftc.errors import UnsupportedError
from peftc.loaders import LoadedModel
from peftc.precision import MATMULS, QUANTIZED, WEIGHTED, budget, matmul_depth
from peftc.verification import OraclePlan, Tolerance


def choose(requested: str | None, backend: Backend, loaded: LoadedModel) -> tuple[str, bool]:
    """The precision of the artifact, and whether the model is traced in it (``build``'s ``precision``).

    Raises:
        UnsupportedError: a ``requested`` precision the target does not compute in.
    """
    capabilities = backend.capabilities
    if requested is not None and requested not in capabilities.precisions:
        hint = f"; {capabilities.precision_hint}" if capabilities.precision_hint else ""
        raise UnsupportedError(
            f"--precision {requested}: target {backend.name!r} computes in {', '.join(capabilities.precisions)}{hint}"
        )
    chosen = requested or (loaded.precision if loaded.precision in capabilities.precisions else "fp32")
    return chosen, chosen != "fp32" and capabilities.precisions[chosen] == "program"


def record(built: Built, backend: Backend, requested: str | None, max_error: float | None) -> dict[str, Any]:
    """The manifest's ``target.precision``: what the artifact computes in, how, and its budget."""
    precision = built.precision
    quantized = precision in QUANTIZED
    depth = matmul_depth(built.fp32.base, WEIGHTED if quantized else MATMULS)
    formula = "u·√(2·depth)" if quantized else "u·√(3·depth)"
    out: dict[str, Any] = {
        "compute": precision,
        "checkpoint": built.loaded.precision,
        "how": backend.capabilities.precisions[precision],
        "depth": depth,
        "budget": None if precision == "fp32" else (max_error or budget(precision, depth)),
        "budget_from": None if precision == "fp32" else ("--max-error" if max_error else formula),
    }
    if requested is None and precision != built.loaded.precision:
        hint = backend.capabilities.precision_hint
        out["note"] = (
            f"the base checkpoint is {built.loaded.precision}; target {backend.name!r} computes in {precision}"
            + (f" ({hint})" if hint else "")
        )
    return out


def plans(built: Built, peft: bool, precision: Mapping[str, Any]) -> list[OraclePlan]:
    """The oracles of each of ``built``'s worlds and the artifact's budget against them."""
    if precision["budget"] is None:
        return [OraclePlan(built.fp32.module, peft)]
    fp32 = OraclePlan(built.fp32.module, peft, Tolerance(None, precision["budget"]))
    if len(built.worlds) == 1:
        return [fp32]
    world = built.world
    return [fp32, OraclePlan(world.module, peft, Tolerance(None, 2 * precision["budget"]), f"@{world.precision}")]


def recorded(manifest_target: Mapping[str, Any]) -> tuple[str, bool]:
    """The precision an artifact was compiled in (``build``'s ``precision``, for ``peftc verify``)."""
    precision = manifest_target.get("precision") or {"compute": "fp32", "how": "program"}
    return precision["compute"], precision["compute"] != "fp32" and precision["how"] == "program"
