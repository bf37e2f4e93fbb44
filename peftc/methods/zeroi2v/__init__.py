"""ZeroI2V: linear adapters and STDHA's temporal shift (``shared/methods.md`` §4.5; not a PEFT method).

* ``ops.py``: the ``peftc::linear_adapter`` and ``peftc::temporal_shift`` activation sites, and the
  math that folds a linear adapter into a projection;
* ``parse.py``: the official checkpoint format and the peftc-native one;
* ``fold.py``: the ``fold-linear-adapters`` pass, run after ``merge``.
"""

from peftc.methods.record import Method
from peftc.methods.zeroi2v import parse
from peftc.methods.zeroi2v.fold import FoldLinearAdaptersPass
from peftc.methods.zeroi2v.ops import LINEAR_ADAPTER, TEMPORAL_SHIFT

METHOD = Method(
    "zeroi2v",
    ("ZEROI2V",),
    parse.parse,
    ops=(LINEAR_ADAPTER, TEMPORAL_SHIFT),
    merged_passes=(FoldLinearAdaptersPass,),
    fields=parse.FIELDS,
)

__all__ = ["METHOD"]
