"""Program-to-program passes; one per file, run by :class:`PassManager` (see ``base.py``)."""

from peftc.passes.base import (
    Diagnostic,
    Pass,
    PassBase,
    PassContext,
    PassManager,
    PassRecord,
    PassResult,
)
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass
from peftc.passes.factor_dora import FactorDoraPass
from peftc.passes.fold_linear_adapters import FoldLinearAdaptersPass
from peftc.passes.fold_ssf import FoldSsfPass
from peftc.passes.insert_sites import InsertSitesPass
from peftc.passes.merge_sites import MergeOptions, MergeSitesPass
from peftc.passes.replace_tensors import ReplaceTensorsPass

__all__ = [
    "Diagnostic",
    "EliminateDeadCodePass",
    "FactorDoraPass",
    "FoldLinearAdaptersPass",
    "FoldSsfPass",
    "InsertSitesPass",
    "MergeOptions",
    "MergeSitesPass",
    "Pass",
    "PassBase",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "ReplaceTensorsPass",
]
