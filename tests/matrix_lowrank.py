"""PEFT configs of the normalised, rotated and generalised low-rank methods (DeLoRA, RoAd, GraLoRA, GLoRA, PEANuT, Super-Tuning,
FRoD) for each ``tests/matrix.py`` family, or the reason one does not apply.

Each function takes a ``matrix.Family`` and returns a PEFT config or a reason string, as the config
functions in ``tests/matrix.py`` do; they live here to keep that file short.
"""

from __future__ import annotations

import re
from typing import Any

from matrix_transforms import LINEAR_ONLY


def linear_targets(family: Any) -> Any:
    """The family's linear targets; a regex where a suffix such as the ViT's "proj" also names a convolution."""
    convs = "|".join(re.escape(c) for c in (*family.conv, *family.conv1d))
    if not convs:
        return list(family.linear)
    return rf"(?!(?:.*\.)?(?:{convs})$)(?:.*\.)?(?:{'|'.join(map(re.escape, family.linear))})"


def delora(family: Any) -> Any:
    from peft import DeloraConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    return DeloraConfig(r=4, delora_lambda=3, target_modules=linear_targets(family))


ROAD_VARIANTS = {"bert": "road_1", "llama": "road_2", "vit": "road_4", "convnet": "road_2"}
"""Every RoAd variant on some family; group_size=4 divides every family's linear outputs."""


def road(family: Any) -> Any:
    from peft import RoadConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    return RoadConfig(variant=ROAD_VARIANTS[family.name], group_size=4, target_modules=linear_targets(family))


def gralora(family: Any) -> Any:
    from peft import GraloraConfig

    # Plain on BERT and the conv net; with the hybrid LoRA term on LLaMA and GPT-2; four blocks on the ViT.
    k, r = (4, 8) if family.name == "vit" else (2, 4)
    hybrid = 2 if family.name in ("llama", "gpt2") else 0
    return GraloraConfig(
        r=r, gralora_k=k, hybrid_r=hybrid, alpha=2 * r, target_modules=linear_targets(family),
        fan_in_fan_out=family.linear_type == "Conv1D",
    )  # fmt: skip


GLORA_FORMS = {
    "bert": ("lora", "lora", "constant"),
    "llama": ("constant", "none", "none"),  # no biases: C, D, E are never read
    "vit": ("vector", "vector", "vector"),
    "convnet": ("none", "lora", "vector"),  # only the bias changes
}
"""Every GLoRA path form (config_A_B, config_C, config_D_E) on some family."""


def glora(family: Any) -> Any:
    from peft import GloraConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    a_b, c, d_e = GLORA_FORMS[family.name]
    targets = linear_targets(family)
    return GloraConfig(r=4, config_A_B=a_b, config_C=c, config_D_E=d_e, target_modules=targets)


PEANUT_SETTINGS = {"bert": (0, "relu"), "llama": (1, "silu"), "vit": (2, "gelu"), "convnet": (1, "tanh")}
"""Depth 0, 1 and 2 and four activations across the families."""


def peanut(family: Any) -> Any:
    from peft import PeanutConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    depth, act_fn = PEANUT_SETTINGS[family.name]
    return PeanutConfig(r=4, depth=depth, act_fn=act_fn, scaling=0.5, target_modules=linear_targets(family))


SUPERTUNING_SETTINGS = {"bert": (True, None), "llama": (False, 2), "vit": (True, 2), "convnet": (False, 2)}
"""(select_top, r): both ends of the magnitude order, with and without the LoRA ("Supra") term."""


def supertuning(family: Any) -> Any:
    from peft import SupertuningConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    top, r = SUPERTUNING_SETTINGS[family.name]
    return SupertuningConfig(sparsity=0.5, select_top=top, r=r, target_modules=linear_targets(family))


def frod(family: Any) -> Any:
    from peft import FrodConfig

    # Projections rebuilt from the base weights on BERT and LLaMA (two layers per category), saved elsewhere.
    return FrodConfig(
        sparse_rate=0.05, target_modules=linear_targets(family), fan_in_fan_out=family.linear_type == "Conv1D",
        progressbar=False, save_projection=family.name not in ("bert", "llama"), projection_prng_key=3,
    )  # fmt: skip
