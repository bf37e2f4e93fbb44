"""Coverage-matrix configs (``tests/matrix.py``) for the PEFT types built from shared or
seeded projections: RandLoRA, VBLoRA, UniLoRA, PVeRA, TinyLoRA. Each function returns a PEFT config for a family, or the
reason the method does not apply to it."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matrix import Family


BUDGET = (
    "PEFT supports it; left out to keep the suite's time: these 20 cells (5 methods × BERT, ViT × merged, "
    "unmerged) all pass, but cost 106 s of test time on the 2-core VM (1.6–9 s a cell; the limit was 10 s "
    "for all). The same layer types are verified on tiny LLaMA, GPT-2 and the conv net's head; "
    "`PEFTC_MATRIX_ALL=1` runs them"
)
"""Why a family PEFT supports is not a cell for these methods (measured with ``PEFTC_MATRIX_ALL=1 pytest
tests/test_matrix.py -k "cell and (bert or vit) and (randlora or vblora or unilora or pvera or tinylora)"
--durations=25``, single process, on a shared, loaded VM: the numbers are noisy)."""


def budget(family: Family) -> str | None:
    """The reason a family is left out of these methods' cells, or None (every family with
    ``PEFTC_MATRIX_ALL=1``)."""
    if os.environ.get("PEFTC_MATRIX_ALL"):
        return None
    return BUDGET if family.name in ("bert", "vit") else None


def linear_targets(family: Family) -> Any:
    """The family's linear targets, as a regex that leaves out its convolutions where it has any (a
    suffix such as the ViT's "proj" also names its patch embedding): for linear-only methods."""
    convs = "|".join(re.escape(c) for c in (*family.conv, *family.conv1d))
    if not convs:
        return list(family.linear)
    return rf"(?!(?:.*\.)?(?:{convs})$)(?:.*\.)?(?:{'|'.join(map(re.escape, family.linear))})"


def randlora(family: Family) -> Any:
    from peft import RandLoraConfig

    if budget(family):
        return budget(family)

    # r=5 on 32/64-wide layers: 7 or 13 bases, so how PEFT pairs the (r, bases) axes of its two
    # flattenings matters.
    fan_in_fan_out = family.linear_type == "Conv1D"
    return RandLoraConfig(r=5, randlora_alpha=10, target_modules=linear_targets(family), fan_in_fan_out=fan_in_fan_out)


def vblora(family: Family) -> Any:
    from peft import VBLoRAConfig

    if budget(family):
        return budget(family)

    # vector_length must divide every adapted size: 8 does on the transformers, 2 on the conv net's 6→4 head.
    length = 2 if family.name == "convnet" else 8
    fan_in_fan_out = family.linear_type == "Conv1D"
    return VBLoRAConfig(
        r=4,
        num_vectors=16,
        vector_length=length,
        topk=2,
        target_modules=linear_targets(family),
        fan_in_fan_out=fan_in_fan_out,
    )


def unilora(family: Family) -> Any:
    from peft import UniLoraConfig

    if budget(family):
        return budget(family)

    # The default save_indices=false: peftc deals the indices again in PEFT's module order.
    fan_in_fan_out = family.linear_type == "Conv1D"
    return UniLoraConfig(r=4, theta_d_length=64, target_modules=linear_targets(family), fan_in_fan_out=fan_in_fan_out)


def pvera(family: Family) -> Any:
    from peft import PveraConfig

    if budget(family):
        return budget(family)

    # d_initial=1: λ_d starts at 1 rather than 0.1, so the perturbed adapter visibly changes outputs.
    fan_in_fan_out = family.linear_type == "Conv1D"
    return PveraConfig(r=8, target_modules=linear_targets(family), fan_in_fan_out=fan_in_fan_out, d_initial=1.0)


def tinylora(family: Family) -> Any:
    from peft import TinyLoraConfig

    if budget(family):
        return budget(family)

    # Linear layers and the token embedding; weight_tying=0.5 ties neighbouring targets' v in pairs.
    targets = linear_targets(family)
    if family.embedding:
        targets = [*targets, family.embedding]  # the families with an embedding have no convolution (a list)
    fan_in_fan_out = family.linear_type == "Conv1D"
    return TinyLoraConfig(r=2, u=4, weight_tying=0.5, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
