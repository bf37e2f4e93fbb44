"""SSF, Scaling & Shifting your Features (``shared/methods.md`` §4.1; not a PEFT method).

* ``ops.py``: the ``peftc::ssf`` activation site and the math that folds it into a neighbour;
* ``parse.py``: the official checkpoint format (recognised by its key names, no config needed) and
  the peftc-native one;
* ``fold.py``: the ``fold-ssf`` pass, run after ``merge``.
"""

from peftc.methods.record import Method
from peftc.methods.ssf import parse
from peftc.methods.ssf.fold import FoldSsfPass
from peftc.methods.ssf.ops import SSF

METHOD = Method(
    "ssf",
    ("SSF",),
    parse.parse,
    ops=(SSF,),
    merged_passes=(FoldSsfPass,),
    recognise=parse.implied_config,
    fields=parse.FIELDS,
)

__all__ = ["METHOD"]
