"""peftc's parser for Hugging Face PEFT LoHa adapters (``peft_type: "LOHA"``).

Keys: ``<m>.hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` on every target, plus the CP
cores ``hada_t1``, ``hada_t2`` on convolutions with a kernel larger than 1 when
``use_effective_conv2d`` is set. Targets are ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``, as in
PEFT. Each becomes one ``loha_weight`` site on its weight (``peftc/ops/loha.py``) with scale α/r;
``modules_to_save`` tensors are full replacements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, ParseOptions
from peftc.ops.loha import LOHA_WEIGHT

FIELDS = common.lycoris_fields("use_effective_conv2d")


def expected_shapes(cfg: Mapping[str, Any], shape: tuple[int, ...], r: int) -> dict[str, tuple[int, ...]]:
    """The LoHa tensors PEFT creates for a weight of ``shape`` (``[d_out, d_in/groups, *kernel]``)."""
    d_out, d_in, kernel = shape[0], shape[1], tuple(shape[2:])
    if cfg.get("use_effective_conv2d") and any(k != 1 for k in kernel):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)  # Conv1d cores are 4-D too
        a, b = (r, d_out), (r, d_in)
        return {"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": a, "hada_w2_b": b, "hada_t1": core, "hada_t2": core}
    a, b = (d_out, r), (r, d_in * math.prod(kernel))
    return {"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": a, "hada_w2_b": b}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a LoHa adapter against the base model's modules (see ``common.parse_lycoris``)."""
    return common.parse_lycoris(
        source, modules, peft_type="LOHA", title="LoHa", fields=FIELDS, op=LOHA_WEIGHT, expected=expected_shapes
    )
