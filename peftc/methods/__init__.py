"""Adapter methods: one module (or package) per method, each ending in its :class:`Method` record.

``registry.py`` lists the records and derives the tables the compiler uses; ``loading.py`` reads
adapters from disk and interprets them (``load_adapter``). This package's own namespace holds only
the records every parser produces (``base.py``), so importing a method never imports the others.
"""

from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Replacement, Site

__all__ = ["Adapter", "AdapterSource", "AdapterTensor", "ParseOptions", "Replacement", "Site"]
