"""The density passes of a compile: ``peftc compile MODEL --adapter A --prune-dead-neurons [--skip-blocks]
--max-error E [--calibration FILE | --calibration-samples N]``.

After the merged mode's passes, on the dense adapter-applied model:

1. *measure*: the base module with the adapters merged by PEFT (the dense model; ``analyze.with_adapters``)
   runs the calibration inputs, and each MLP block's activations are counted (``measure.py``);
2. *search*: ``exploit.run_passes`` tries each rewrite on that eager model and keeps it where the
   model's outputs on held-out inputs stay within the budget (``--max-error``, default
   :data:`DEFAULT_BUDGET`, relative; with fp32's absolute bound as well where the budget is within
   fp32's relative one: :func:`tolerance`, never looser than verification); held out as ``peftc
   analyze`` does (``analyze.held_out_split``). Both the calibration and the held-out inputs include
   one seeded batch of each ``analyze.coverage`` shape: the verifier's three, short sequences and a
   long one, with a padded row, so a neuron silent on the calibration file's lengths but active at
   the verifier's is seen, and a removal that breaks those shapes is refused here, not at verification;
3. *rewrite*: the kept rewrites become one ``sparsify-deft`` pass on the merged program
   (``sparsify_pass.py``), run by the pass manager like any other;
4. *check*: the rewritten program against the reference program (the dense adapter-applied model,
   adapters unmerged) on the held-out inputs, with the same :func:`tolerance`; its error is the
   artifact's, recorded per layer in the manifest's ``target.density``.

The artifact is then verified against the reference program and PEFT's dense model within the
budget (relative to each output's scale; no looser than fp32's own bound) instead of fp32's 1e-5,
and ``peftc verify`` re-checks it within the same budget. Fails (``VerificationError``, exit 1)
naming the worst layers: a search that keeps no rewrite (the artifact would be the dense one under
another name, as an integer precision that keeps every layer in float), and a rewritten program
over the budget on the held-out inputs. Refused (exit 2): a model without a known MLP block, an
exported program (no eager module to measure).

On an activation without exact zeros (GELU, SiLU, gated or not) ``--prune-dead-neurons`` is
approximate: a neuron is dead when its down-projection input stays within ``--dead-threshold`` (tau,
default :data:`~peftc.density.measure.THRESHOLD`) on every calibration row, and its mean input times
its down column is folded into the down bias (``exploit.prune``, ``sparsify_pass``); the same budget
and held-out check decide, layer by layer, as for ReLU.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from peftc import ir
from peftc.density import exploit
from peftc.density.analyze import held_out_split, with_adapters
from peftc.density.blocks import Block, find_blocks
from peftc.density.measure import THRESHOLD, Counts, measure
from peftc.density.sparsify_pass import BlockPlan, SparsifyDeftPass
from peftc.errors import UnsupportedError, VerificationError
from peftc.passes import pipelines
from peftc.passes.base import PassContext, PassManager, PassRecord
from peftc.verification import OraclePlan, Tolerance, program_oracle
from peftc.verification.compare import TOLERANCES

if TYPE_CHECKING:
    from peftc.driver.build import Built
    from peftc.driver.modes import Optimized
    from peftc.options import CompileOptions

DEFAULT_BUDGET = 1e-5
"""``--max-error`` of the density passes when none is given: fp32's own relative bound (``compare.py``)."""
HELD_OUT = 4
"""Generated held-out batches (with ``--calibration FILE``: every fourth batch of it, from the second)."""


def sparsify(
    options: CompileOptions, built: Built, optimized: Optimized, ctx: PassContext
) -> tuple[Optimized, dict[str, Any]]:
    """Run the density passes ``options`` ask for on ``optimized`` (module docstring); the rewritten
    program and the manifest's ``target.density`` record.

    Raises:
        UnsupportedError: the model or its activations do not allow the passes (one line).
        VerificationError: no rewrite fits the budget, or the rewritten program exceeds it.
    """
    budget = options.max_error or DEFAULT_BUDGET
    module = built.fp32.module
    if module is None or built.fp32.reference is None:
        raise UnsupportedError("the density passes measure an nn.Module in eager mode; the base is an exported program")
    blocks = find_blocks(module)
    signature = built.loaded.signature.in_dtype(torch.float32)
    calib, feeds, held = held_out_split(
        options.calibration, options.calibration_samples, HELD_OUT, signature, options.seed, True
    )
    eager = with_adapters(module, [str(a) for a in options.adapters], options.allow_pickle)
    eager = copy.deepcopy(eager) if eager is module else eager  # the search rewrites it
    counts = measure(eager, blocks, feeds, THRESHOLD if options.dead_threshold is None else options.dead_threshold)
    search = exploit.Search(eager, blocks, held, budget, tolerance(budget).abs)
    records = exploit.run_passes(search, counts, options.density)
    plan = _plan(blocks, counts, records)
    if not plan:
        raise VerificationError(_nothing_kept(options.density, records, budget, calib.record))
    program, done = _rewritten(optimized.program, plan, ctx, [r.name for r in optimized.records])
    expected = [program_oracle(built.fp32.reference)(_torch(f)) for f in held]
    error, within = _error(program, held, expected, tolerance(budget))
    if not within:
        alone = {b.name: _error(_rewritten(optimized.program, [b], ctx)[0], held, expected)[0] for b in plan}
        worst = ", ".join(f"{name} {e:.2e}" for name, e in sorted(alone.items(), key=lambda item: -item[1])[:5])
        raise VerificationError(
            f"{' '.join('--' + p for p in options.density)}: the rewritten program's error on the held-out inputs "
            f"{error:.2e} exceeds the budget {budget:.3g}{_absolute(budget)} (the eager search measured "
            f"{search.error:.2e}); "
            f"the worst layers (error rewritten alone): {worst}"
        )
    record = {
        "passes": list(options.density),
        "max_error": budget,
        "budget_from": "--max-error" if options.max_error else "default (fp32's relative bound)",
        "error": error,
        "search_error": search.error,
        "dead_threshold": None if all(b.exact_zeros for b in blocks) else counts[0].threshold,
        "calibration": calib.record,
        "held_out_batches": len(held),
        "neurons": sum(_width(c) for c in counts),
        "removed": sum(_width(c) - len(p.keep) for p in plan for c in counts if c.block.activation == p.name),
        "layers": records,
    }
    return dataclasses.replace(optimized, program=program, records=(*optimized.records, *done)), record


def _rewritten(
    program: ir.Program, plan: Sequence[BlockPlan], ctx: PassContext, history: Sequence[str] = ()
) -> tuple[ir.Program, list[PassRecord]]:
    """``program`` after :func:`pipelines.sparsified` with ``plan``, and the passes' records."""
    return PassManager(pipelines.sparsified(SparsifyDeftPass(plan))).run(program, ctx, history=list(history))


def _error(
    program: ir.Program,
    feeds: Sequence[Mapping[str, Any]],
    expected: Sequence[Mapping[str, Any]],
    within: Tolerance | None = None,
) -> tuple[float, bool]:
    """The worst relative error of ``program`` over ``feeds`` against the outputs ``expected``, and whether
    every output is ``within`` the tolerance (as verification compares)."""
    run = program_oracle(program)
    return exploit.judged(expected, [run(_torch(f)) for f in feeds], within)


def _absolute(budget: float) -> str:
    bound = tolerance(budget).abs
    return "" if bound is None else f" (relative; absolute {bound:g})"


def tolerance(budget: float) -> Tolerance:
    """The held-out check's tolerance: the verifier's for an artifact sparsified within ``budget``
    (:func:`plans`), or stricter: ``budget`` relative to each output's scale, and fp32's absolute bound
    where the budget is within fp32's own relative one (the verifier then uses fp32's tolerance)."""
    return Tolerance(None if budget > DEFAULT_BUDGET else TOLERANCES["float32"].abs, budget)


def _width(count: Counts) -> int:
    return 0 if count.nonzero is None else int(count.nonzero.numel())


def _torch(feed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in feed.items()}


def _worst(records: Sequence[Mapping[str, Any]], count: int = 5) -> str:
    """The attempted rewrites with the largest model error, worst first: ``layer (pass) error``."""
    tried = sorted((r for r in records if "error" in r and "why" not in r), key=lambda r: -r["error"])
    return ", ".join(f"{r['name']} ({r['pass']}) {r['error']:.2e}" for r in tried[:count]) or "none tried"


def _nothing_kept(passes: Sequence[str], records: Sequence[Mapping[str, Any]], budget: float, calib: Any) -> str:
    flags = " ".join(f"--{p}" for p in passes)
    reasons = sorted({r["why"] for r in records if "why" in r})
    if not any("why" not in r for r in records):
        return (
            f"{flags}: nothing to rewrite on the calibration inputs ({calib['batches']} batches): {'; '.join(reasons)}"
        )
    return (
        f"{flags} cannot meet the error budget {budget:.3g} on the held-out inputs: every rewrite exceeds it; "
        f"the worst layers (model error with the rewrite): {_worst(records)}"
    )


def plans(plans: Sequence[OraclePlan], target: Mapping[str, Any]) -> list[OraclePlan]:
    """``plans`` with the density budget of ``target`` (the manifest's target record) as their tolerance
    where the artifact was sparsified with a budget above fp32's own bound."""
    density = target.get("density")
    if not density or density["max_error"] <= DEFAULT_BUDGET:
        return list(plans)
    return [dataclasses.replace(p, tolerance=tolerance(density["max_error"])) for p in plans]


def kept(count: Counts) -> tuple[int, ...]:
    """The neurons a pruned block keeps: all but ``exploit.dead_neurons``."""
    dead = set(exploit.dead_neurons(count).tolist())
    assert count.nonzero is not None
    return tuple(i for i in range(count.nonzero.numel()) if i not in dead)


def _plan(blocks: Sequence[Block], counts: Sequence[Counts], records: Sequence[Mapping[str, Any]]) -> list[BlockPlan]:
    """The kept rewrites per block: skipped (no neuron kept) where skip-blocks kept it, else pruned."""
    done = {(r["name"], r["pass"]) for r in records if r["kept"]}
    plan = []
    for block, count in zip(blocks, counts, strict=True):
        if (block.activation, "skip-blocks") in done:
            plan.append(BlockPlan(block.activation, block.ups, block.down, ()))
        elif (block.activation, "prune-dead-neurons") in done:
            means = () if block.exact_zeros else tuple(count.mean().tolist())
            plan.append(BlockPlan(block.activation, block.ups, block.down, kept(count), means))
    return plan
