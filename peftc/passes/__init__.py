"""Program-to-program passes: the contract and the manager (``base.py``), one pass per file.

This namespace holds the infrastructure only; passes are imported from their modules, and
``pipelines.py`` is the one place that orders them. Method-specific passes (folds, DoRA's factor)
live with their method in ``peftc/methods/``.
"""

from peftc.passes.base import (
    Diagnostic,
    Pass,
    PassBase,
    PassContext,
    PassManager,
    PassRecord,
    PassResult,
)

__all__ = ["Diagnostic", "Pass", "PassBase", "PassContext", "PassManager", "PassRecord", "PassResult"]
