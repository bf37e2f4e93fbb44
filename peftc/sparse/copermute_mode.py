"""The ``--co-permute`` build mode: unmerged S²FT sites as slices of a base permuted once.

:meth:`CoPermuted.optimize` plans the order from the reference program's S²FT sites
(``copermute.plan``), runs ``co-permute`` on the base program alone and checks the permuted base
against the original on seeded inputs (every output, fp32 tolerances) *before* any adapter is
applied, then runs ``co-permute`` and the unmerged passes on the adapted program. The manifest's
``options.co_permute`` records the orders and the base check's error. The artifact is then verified
like any unmerged stack (against the reference program in the original order, and PEFT).

Outputs that expose heads or channels would come out in the new order; a generation step's KV cache
(``--task text-generation``) does, so that combination is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from peftc.driver.build import Built
from peftc.driver.modes import Optimized, Unmerged, in_each_world, signature
from peftc.errors import UnsupportedError, VerificationError
from peftc.passes import pipelines
from peftc.passes.base import PassContext, PassManager
from peftc.sparse import extract
from peftc.sparse.copermute import Plan, plan
from peftc.sparse.copermute_pass import CoPermutePass, selections
from peftc.verification import program_oracle, verify

BASE_CASES = 2
"""Seeded input shapes the permuted base is checked on."""


@dataclasses.dataclass(frozen=True)
class CoPermuted(Unmerged):
    """Unmerged, with the base co-permuted so S²FT sites are slices (module docstring)."""

    label: ClassVar[str] = "co-permute the base, keep sites unmerged"
    seed: int = 0

    def optimize(self, built: Built, ctx: PassContext) -> Optimized:
        chosen = plan_for(built)
        check = check_base(built, chosen, ctx, self.seed)
        passes = lambda: pipelines.co_permuted(CoPermutePass(chosen))  # noqa: E731
        program, records = in_each_world(built, [w.reference for w in built.worlds], passes, ctx)
        options = {"stack": [a.name for a in built.adapters], "co_permute": {**chosen.to_json(), "base_check": check}}
        return Optimized(program, records, signature(built), options)


def plan_for(built: Built) -> Plan:
    """The order for the adapters' S²FT sites.

    Raises:
        UnsupportedError: a generation step (its KV cache exposes heads), a model without a config
            naming its heads, no S²FT site on a dimension co-permutation orders, or selections it
            cannot make contiguous (``copermute.plan``).
    """
    if built.loaded.task == "text-generation":
        raise UnsupportedError(
            "--co-permute with --task text-generation (given, or inferred from config.architectures): the KV cache "
            "inputs and outputs carry K/V heads in the base's order, which co-permutation changes; compile the "
            "generation step without --co-permute, or the model's own forward with --task none"
        )
    config = getattr(built.loaded.module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise UnsupportedError("--co-permute needs a Hugging Face model whose config names its heads")
    reference = built.fp32.reference
    found = selections(reference)
    if not found:
        raise UnsupportedError("--co-permute: no S²FT (PEFTC_S2FT) site to make contiguous")
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict.items()}
    chosen = plan(found, extract.heads(config.to_dict()), shapes)
    if not chosen.attention and not chosen.mlp:
        raise UnsupportedError(
            "--co-permute: no S²FT site selects heads (q/k/v rows, o columns) or FFN channels (gate/up rows, "
            "down columns) of a LLaMA-style block"
        )
    return chosen


def check_base(built: Built, chosen: Plan, ctx: PassContext, seed: int = 0) -> dict[str, Any]:
    """The permuted base program against the original one on seeded inputs; its worst relative error.

    Raises:
        VerificationError: the permuted base computes something else (the line names the output).
    """
    base = built.fp32.base
    permuted, _ = PassManager([CoPermutePass(chosen)]).run(base, ctx)
    report = verify(
        program_oracle(permuted),
        built.loaded.signature.in_dtype(torch.float32),
        {"original base": program_oracle(base)},
        seed=seed,
        cases=BASE_CASES,
    )
    if not report.passed:
        error = report.error()
        raise VerificationError(f"--co-permute: the permuted base differs from the original: {error}", error.table)
    worst = max(o.max_rel for c in report.cases for o in c.outputs)
    return {"cases": len(report.cases), "max_rel_error": worst, "seed": seed}
