"""AdaLoRA (PEFT ``ADALORA``; ``shared/methods.md`` §2.6): its weight transform and peftc's parser.

AdaLoRA trains an SVD-shaped update ``ΔW = P Λ Q``: ``A`` (``[r, d_in]``, Q), ``B`` (``[d_out, r]``, P)
and the singular values ``E`` (``[r, 1]``, Λ) whose pruned entries were dropped before saving. PEFT
scales it by ``α / (ranknum + 1e-5)``, where ``ranknum`` is the *initial* rank ``init_r`` even after
pruning — the division, and its ``1e-5``, are part of the trained model::

    W' = W + (B · (A ⊙ E)) · α / (ranknum + 1e-5)

``ΔW`` is ``[d_out, d_in]``: transposed for a Conv1D (``fan_in_fan_out``), reshaped to the kernel for a
convolution, whose ``A`` is ``[r, d_in·k_h·k_w]``.

**Adapter files.** Keys: ``<m>.lora_A`` ``[r_m, d_in]``, ``<m>.lora_B`` ``[d_out, r_m]``,
``<m>.lora_E`` ``[r_m, 1]`` on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d`` targets (``d_in``
is ``in·k_h·k_w`` for a convolution), where ``r_m`` is the rank left after pruning: ``rank_pattern``
maps ``<m>.lora_E`` to the mask of kept singular values (``init_r`` entries) and PEFT saves only the
kept rows. Every module's scale is ``α / (init_r + 1e-5)``, pruned or not (above). Trained biases
and ``modules_to_save`` tensors are full replacements."""

from __future__ import annotations

import numpy as np
import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable, conv_attributes
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.lora import parse as lora
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op, from_out_in

ADALORA_WEIGHT = SiteOp(
    name="adalora_weight",
    form="weight",
    tensor_roles=("lora_A", "lora_B", "lora_E"),
    scalars=("scale", "ranknum", "layout"),
)


def delta_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_e: torch.Tensor,
    scale: float,
    ranknum: float,
    layout: str,
) -> torch.Tensor:
    """``ΔW`` in fp32, shaped like ``weight``, in PEFT's order of operations."""
    a, b, e = (t.to(torch.float32) for t in (lora_a, lora_b, lora_e))
    delta = from_out_in(b @ (a * e), weight, layout)
    # PEFT adds 1e-5 to a float32 tensor: the divisor is rounded to float32 after the addition.
    divisor = float(np.float32(ranknum) + np.float32(1e-5))
    return delta * scale / divisor


@composite_op(
    "adalora_weight(Tensor weight, Tensor lora_a, Tensor lora_b, Tensor lora_e, float scale, float ranknum, "
    "str layout) -> Tensor"
)
def adalora_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_e: torch.Tensor,
    scale: float,
    ranknum: float,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` (fp32, cast back to ``W``'s dtype); see the module docstring."""
    delta = delta_weight(weight, lora_a, lora_b, lora_e, scale, ranknum, layout)
    return (weight.to(torch.float32) + delta).to(weight.dtype)


_SCHEDULE = "training schedule of the rank allocator"
FIELDS = common.Fields(
    honoured=(
        "init_r",
        "lora_alpha",
        "rank_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "r": "not read by AdaLoRA (init_r is the rank)",
        "alpha_pattern": "not read by PEFT's AdaLoRA",
        "use_rslora": "not read by PEFT's AdaLoRA",
        "lora_dropout": "dropout is the identity at inference",
        "init_lora_weights": "initialisation only (the trained tensors are in the file)",
        **dict.fromkeys(("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "total_step"), _SCHEDULE),
        "orth_reg_weight": "training regulariser",
        **{k: why for k, why in lora.FIELDS.ignored.items() if k not in ("lora_dropout",)},
    },
    unsupported={
        "use_dora": "AdaLoRA with use_dora is refused by PEFT itself",
        "loftq_config": "AdaLoRA with LoftQ is refused by PEFT itself",
        "trainable_token_indices": "trainable_token_indices with AdaLoRA is not supported",
        "target_parameters": "target_parameters with AdaLoRA is not supported",
        "lora_bias": "lora_bias with AdaLoRA is not supported",
        "eva_config": "EVA initialisation with AdaLoRA is not supported",
        "corda_config": "CorDA initialisation with AdaLoRA is not supported",
        "lora_ga_config": "LoRA-GA initialisation with AdaLoRA is not supported",
        **lora.FIELDS.unsupported,
    },
    defaults={"init_r": 12, "lora_alpha": 8, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D", "Conv2d")
ROLES = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an AdaLoRA adapter against the base model's modules.

    Raises:
        InputError: a key that maps to no targeted module, a ``rank_pattern`` entry for a module the
            adapter does not adapt or whose mask disagrees with the saved rank, or a shape that
            disagrees with the base module (the message names the key and both shapes).
        UnsupportedError: a target that is not a linear layer or an ungrouped Conv2d, or a config option
            PEFT's AdaLoRA refuses.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "ADALORA", FIELDS)
    common.check_number(source, "init_r", "lora_alpha")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: AdaLoRA config has no target_modules")
    grouped = common.group_keys(source, modules, common.suffix_roles(ROLES))
    common.check_modules(source, grouped, modules, lora.targeted(cfg, modules))
    masks = _rank_masks(source, set(grouped.modules))
    init_r = int(cfg.get("init_r", 12))
    alpha = float(cfg.get("lora_alpha", 8))
    sites: list[Site] = []
    warnings: list[str] = []
    for path, tensors in sorted(grouped.modules.items()):
        module = modules[path]
        layout = common.layout(source, module, "AdaLoRA", TYPES)
        common.require_roles(source, path, tensors, list(ROLES.values()))
        rank = sum(masks[path]) if path in masks else init_r
        if layout == "conv" and (conv_attributes(module) or {}).get("groups", 1) != 1:
            raise UnsupportedError(
                f"{source.config_path.name}: AdaLoRA on grouped convolution {path!r} (PEFT fails on it too)"
            )
        d_in, d_out = common.io_dims(modules, module, layout)
        base = f"(rank {rank}, base weight {list(modules.state_shapes[module.params['weight']])})"
        common.expect_shape(source, tensors["lora_A"], (rank, d_in), f"[r={rank}, d_in={d_in}] {base}")
        common.expect_shape(source, tensors["lora_B"], (d_out, rank), f"[d_out={d_out}, r={rank}] {base}")
        common.expect_shape(source, tensors["lora_E"], (rank, 1), f"[r={rank}, 1] {base}")
        if layout == "linear_t" and not cfg.get("fan_in_fan_out"):
            warnings.append(f"fan_in_fan_out=False but {path!r} is a Conv1D; using fan_in_fan_out=True as PEFT does")
        # PEFT rebuilds a pruned module at its kept rank, which resets the scale to α (or to the kept
        # rank when α ≤ 0), and restores ranknum to init_r.
        scale = alpha if alpha > 0 else float(rank if path in masks else init_r)
        info = {"module_type": module.class_name, "r": rank, "init_r": init_r, "alpha": alpha}
        scalars = {"scale": scale, "ranknum": float(init_r), "layout": layout}
        sites.append(Site(path, ADALORA_WEIGHT.name, dict(tensors), scalars, info, "weight"))
    return common.adapter(source, "adalora", sites, grouped, honoured, ignored, warnings)


def _rank_masks(source: AdapterSource, adapted: set[str]) -> dict[str, list[bool]]:
    """``rank_pattern`` as module path → kept-rank mask, checked against the adapted modules."""
    pattern = source.config.get("rank_pattern") or {}
    init_r = int(source.config.get("init_r", 12))
    masks = {}
    for key, mask in pattern.items():
        path = key.removesuffix(".lora_E").removeprefix(common.PREFIX)
        if path not in adapted:
            raise InputError(
                f"{source.config_path}: rank_pattern names {key!r}, but the adapter has no tensors for module "
                f"{path!r}" + common.nearest(path, sorted(adapted))
            )
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(b, bool) for b in mask):
            raise InputError(f"{source.config_path}: rank_pattern[{key!r}] is not a list of init_r={init_r} booleans")
        masks[path] = mask
    return masks


METHOD = Method("adalora", ("ADALORA",), parse, ops=(ADALORA_WEIGHT,), fields=FIELDS)
