"""peftc's parser for Hugging Face PEFT LoKr adapters (``peft_type: "LOKR"``).

PEFT splits ``d_out = a·b`` and ``d_in/groups = c·d`` (:func:`factorization`) and stores, per target:

* the left factor ``<m>.lokr_w1`` ``[a, c]``, or ``lokr_w1_a`` ``[a, r]`` + ``lokr_w1_b`` ``[r, c]`` when
  ``decompose_both`` and ``r < max(a, c)/2``;
* the right factor ``<m>.lokr_w2`` ``[b, d, *kernel]`` when ``r ≥ max(b, d)/2``; otherwise, for a
  convolution with a kernel larger than 1 under ``use_effective_conv2d``, the CP form ``lokr_t2``
  ``[r, r, *kernel]`` (``[r, r, k, 1]`` for Conv1d) + ``lokr_w2_a`` ``[r, b]`` + ``lokr_w2_b`` ``[r, d]``;
  else ``lokr_w2_a`` ``[b, r]`` + ``lokr_w2_b`` ``[r, d·k…]``.

Targets are ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``, as in PEFT. Each becomes one
``lokr_weight`` site on its weight (``peftc/ops/lokr.py``) with scale α/r; ``modules_to_save`` tensors
are full replacements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, ParseOptions
from peftc.ops.lokr import LOKR_WEIGHT

FIELDS = common.lycoris_fields("use_effective_conv2d", "decompose_both", "decompose_factor")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m·n = dimension``, as LyCORIS (and PEFT) do.

    A positive ``factor`` that divides ``dimension`` is taken as ``m`` as is (so ``m > n`` can
    happen). Otherwise ``m`` is the largest divisor not above ``factor`` (any, for -1) that is reached
    walking the divisors upwards until they pass √dimension; the pair is then returned ascending.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, dimension + 1):
        if dimension % candidate:
            continue
        if candidate > limit:
            break
        m = candidate
        if m >= dimension // m:
            break
    return min(m, dimension // m), max(m, dimension // m)


def expected_shapes(cfg: Mapping[str, Any], shape: tuple[int, ...], r: int) -> dict[str, tuple[int, ...]]:
    """The LoKr tensors PEFT creates for a weight of ``shape`` (``[d_out, d_in/groups, *kernel]``)."""
    kernel = tuple(shape[2:])
    factor = int(cfg.get("decompose_factor", -1))
    a, b = factorization(shape[0], factor)
    c, d = factorization(shape[1], factor)
    tensors: dict[str, tuple[int, ...]]
    if cfg.get("decompose_both") and r < max(a, c) / 2:
        tensors = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    else:
        tensors = {"lokr_w1": (a, c)}
    if r >= max(b, d) / 2:
        tensors["lokr_w2"] = (b, d, *kernel)
    elif cfg.get("use_effective_conv2d") and any(k != 1 for k in kernel):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        tensors.update(lokr_t2=core, lokr_w2_a=(r, b), lokr_w2_b=(r, d))
    else:
        tensors.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
    return tensors


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a LoKr adapter against the base model's modules (see ``common.parse_lycoris``)."""
    common.check_number(source, "decompose_factor")
    return common.parse_lycoris(
        source, modules, peft_type="LOKR", title="LoKr", fields=FIELDS, op=LOKR_WEIGHT, expected=expected_shapes
    )
