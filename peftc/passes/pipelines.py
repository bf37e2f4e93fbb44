"""The pass lists every compile runs, in order. Order is read here and nowhere else.

A compile runs two stages:

* ``adapt``: make the program compute the adapted model. Its output is the *reference program*:
  every site op's eager body is the method's reference math, so verification compares artifacts
  against it.
* ``optimize``: rewrite for deployment without changing the numbers beyond rounding (merge or keep
  sites, then clean up).
"""

from __future__ import annotations

from collections.abc import Sequence

from peftc.methods.base import Adapter
from peftc.passes.base import Pass
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass
from peftc.passes.factor_dora import FactorDoraPass
from peftc.passes.fold_linear_adapters import FoldLinearAdaptersPass
from peftc.passes.fold_ssf import FoldSsfPass
from peftc.passes.insert_sites import InsertSitesPass
from peftc.passes.merge_sites import MergeSitesPass
from peftc.passes.replace_tensors import ReplaceTensorsPass


def adapt(adapters: Sequence[Adapter]) -> list[Pass]:
    """Passes that turn the base program into the reference adapted program."""
    adapters = tuple(adapters)
    return [ReplaceTensorsPass(adapters), InsertSitesPass(adapters), EliminateDeadCodePass()]


def optimize(*, merge: bool) -> list[Pass]:
    """Deployment rewrites: merge every mergeable site (``merge=True``), then fold re-parameterisable
    activation sites (SSF, linear adapters) into the weights they now sit next to; or keep sites
    unmerged with everything that depends only on weights (DoRA's norm) computed once, here."""
    if merge:
        return [MergeSitesPass(), FoldSsfPass(), FoldLinearAdaptersPass(), EliminateDeadCodePass()]
    return [FactorDoraPass(), EliminateDeadCodePass()]
