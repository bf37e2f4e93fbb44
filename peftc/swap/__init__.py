"""Swappable artifacts: one compile, many LoRA, S²FT or sparse-ΔW adapters, switched and mixed per batch
row at run time.

The whole feature lives here:

* ``table.py``: the slot table, the contract between a compiled model and its adapter files;
* ``slots.py``: planning slots for the given adapters, packing an adapter into them, refusals
  (``s2ft_slots.py`` / ``sparse_slots.py``: the index slots of S²FT and sparse-ΔW adapters);
* ``ops.py`` / ``onnx.py``: the slot site ops and their ONNX translations;
* ``mode.py``: the ``--swappable`` build mode; ``verify.py``: how such an artifact is verified;
* ``files.py``: adapter files; ``banks.py``: per-row adapter banks and files read once;
* ``runtime.py``: the runner that picks each call's slot values;
* ``manage.py``: ``peftc add-adapter`` / ``remove-adapter``.

Targets take part through ``SlotBackend`` / ``SlotRunner`` (``peftc/backends/base.py``) and import
nothing from here.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"add_adapter": "peftc.swap.manage", "remove_adapter": "peftc.swap.manage"}


def __getattr__(name: str) -> Any:
    """``add_adapter`` and ``remove_adapter``, imported on first use (they need the whole compiler)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peftc.swap' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["add_adapter", "remove_adapter"]
