"""The pass lists every compile runs, in order. Order is read here and nowhere else.

A compile runs two stages:

* ``adapt``: make the program compute the adapted model. Its output is the *reference program*:
  every site op's eager body is the method's reference math, so verification compares artifacts
  against it.
* ``optimize``: rewrite for deployment without changing the numbers beyond rounding. Each build mode
  has its list: :func:`merged`, :func:`unmerged`, :func:`co_permuted`, :func:`swappable`; :func:`sparsified` runs
  after :func:`merged` when the DEFT passes are asked for. Methods add their own passes to
  the first two (``Method.merged_passes`` / ``unmerged_passes``), in the order of
  ``peftc/methods/registry.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from peftc.methods import registry
from peftc.methods.base import Adapter
from peftc.passes.base import Pass
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass
from peftc.passes.insert_sites import InsertSitesPass
from peftc.passes.merge_sites import MergeSitesPass
from peftc.passes.replace_tensors import ReplaceTensorsPass


def adapt(adapters: Sequence[Adapter]) -> list[Pass]:
    """Passes that turn the base program into the reference adapted program."""
    adapters = tuple(adapters)
    return [ReplaceTensorsPass(adapters), InsertSitesPass(adapters), EliminateDeadCodePass()]


def merged(quantized: Sequence[Pass] = ()) -> list[Pass]:
    """Merge every mergeable site, then fold re-parameterisable activation sites (SSF, linear
    adapters) into the weights they now sit next to. ``quantized``: the passes of a LoRA on a quantized
    base (``merge-quantized``, ``quantize-embeddings``: ``peftc/quant/``), first."""
    return [*quantized, MergeSitesPass(), *registry.passes("merged"), EliminateDeadCodePass()]


def unmerged(quantized: Sequence[Pass] = ()) -> list[Pass]:
    """Keep sites unmerged, with everything that depends only on weights (DoRA's norm) computed once, here
    (``quantized``: as for :func:`merged`; ``merge-quantized`` keeps QLoRA sites two-path and records them)."""
    return [*quantized, *registry.passes("unmerged"), EliminateDeadCodePass()]


def co_permuted(permute: Pass) -> list[Pass]:
    """:func:`unmerged` after ``permute`` (``co-permute``, ``peftc/sparse/copermute_pass.py``, with its
    plan): the base permuted once so S²FT sites are slices."""
    return [permute, *unmerged()]


def sparsified(sparsify: Pass) -> list[Pass]:
    """After :func:`merged`, with the DEFT passes (``--prune-dead-neurons``, ``--skip-blocks``): ``sparsify``
    (``sparsify-deft``, ``peftc/density/sparsify_pass.py``, with the plan the density search chose)."""
    return [sparsify, EliminateDeadCodePass()]


def optimize(*, merge: bool) -> list[Pass]:
    """:func:`merged` or :func:`unmerged`."""
    return merged() if merge else unmerged()


def swappable(slots: Adapter) -> list[Pass]:
    """Put the zero adapter slots (``peftc.swap.slots.slot_adapter``) on the base program."""
    return [InsertSitesPass((slots,)), EliminateDeadCodePass()]
