"""PEANuT (PEFT ``PEANUT``): its weight transform and peftc's parser.

PEANuT computes a linear layer's update from the base weight itself, through a small non-linear
network of depth ``d`` applied to the rows of ``Wᵀ`` (``[d_in, d_out]``)::

    h₀ = σ(Wᵀ Aᵀ)                                      A [r, d_out]
    encode, k = 1…d:  h_k = σ(h_{k−1} E_kᵀ)            E_k [r, r]
    decode, k = 1…d:  g = σ(g D_kᵀ) + h_{d−k}          D_k [r, r], starting from g = h_d
    ΔW = s · (g Bᵀ)ᵀ                                    B [d_out, r],   W' = W + ΔW

with ``σ`` the config's ``act_fn`` and ``s`` its ``scaling``. PEFT's merge adds this ``ΔW`` computed
from the weight before the merge; its unmerged forward computes the same ``ΔW`` from the base weight
on every call and adds ``x ΔWᵀ``, the same function (checked against PEFT's layers in the tests).
``ΔW`` depends on ``W``, so a weight site is exact where a call site would not be simpler: peftc
computes it from the weight the site reads (the base, or the weight an earlier stacked adapter
left, as PEFT's sequential merges do). Formed in fp32; the result has ``W``'s dtype.

``act_fn`` is any of :data:`ACTIVATIONS` (transformers' ``ACT2FN`` functions of those names,
written out here); PEFT accepts the others ``ACT2FN`` holds too, which peftc refuses by name.

**Adapter files.** Keys per target (``nn.Linear`` only, as in PEFT): ``<m>.peanut_A.weight``
``[r, d_out]``, ``<m>.peanut_B.weight`` ``[d_out, r]`` and ``<m>.peanut_encoders.<k>.weight``,
``<m>.peanut_decoders.<k>.weight`` ``[r, r]`` for ``k < depth``; the encoders and the decoders are
each stacked into one ``[depth, r, r]`` site tensor (recorded under its keys joined by `` + ``). ``modules_to_save`` tensors are full
replacements. Each target becomes one ``peanut_weight`` site on its weight.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

PEANUT_WEIGHT = SiteOp(
    name="peanut_weight",
    form="weight",
    tensor_roles=("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders"),
    scalars=("scaling", "act_fn"),
)


def _gelu_tanh_written_out(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "relu": torch.relu,
    "relu2": lambda x: torch.relu(x).square(),
    "relu6": lambda x: torch.clamp(x, 0.0, 6.0),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_tanh_written_out,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}
"""The ``act_fn`` names peftc computes, each as transformers' ``ACT2FN`` defines it."""


def delta_weight(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    encoders: torch.Tensor | None,
    decoders: torch.Tensor | None,
    scaling: float,
    act_fn: str,
) -> torch.Tensor:
    """``ΔW`` ``[d_out, d_in]`` in fp32 from the weight ``[d_out, d_in]`` (module docstring)."""
    act = ACTIVATIONS[act_fn]
    h = act(weight.to(torch.float32).T @ a.to(torch.float32).T)
    residuals = []
    for encoder in () if encoders is None else encoders.to(torch.float32).unbind(0):
        residuals.append(h)
        h = act(h @ encoder.T)
    for decoder in () if decoders is None else decoders.to(torch.float32).unbind(0):
        h = act(h @ decoder.T) + residuals.pop()
    return (h @ b.to(torch.float32).T * scaling).T


@composite_op(
    "peanut_weight(Tensor weight, Tensor peanut_a, Tensor peanut_b, Tensor? encoders, Tensor? decoders, "
    "float scaling, str act_fn) -> Tensor"
)
def peanut_weight(
    weight: torch.Tensor,
    peanut_a: torch.Tensor,
    peanut_b: torch.Tensor,
    encoders: torch.Tensor | None,
    decoders: torch.Tensor | None,
    scaling: float,
    act_fn: str,
) -> torch.Tensor:
    """``W + ΔW(W)`` for an ``nn.Linear`` weight (fp32 math, cast back to ``W``'s dtype)."""
    delta = delta_weight(weight, peanut_a, peanut_b, encoders, decoders, scaling, act_fn)
    return (weight.to(torch.float32) + delta).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "depth",
        "act_fn",
        "scaling",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    ),
    ignored={"init_weights": "initialisation only (the trained network is in the file)"},
    defaults={"r": 32, "depth": 0, "act_fn": "relu", "scaling": 1.0},
)
_KEY = re.compile(r"(?P<module>.+)\.peanut_(?:(?P<end>A|B)|(?P<stack>encoders|decoders)\.(?P<k>\d+))\.weight")


def _role(path: str) -> tuple[str, str] | None:
    match = _KEY.fullmatch(path)
    if match is None:
        return None
    role = f"peanut_{match['end']}" if match["end"] else f"peanut_{match['stack']}.{int(match['k'])}"
    return match["module"], role


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a PEANuT adapter against the base model's modules.

    Raises:
        InputError: a rank, depth or scaling that is not a valid number; a key for no targeted module,
            a targeted module without a factor or layer its depth needs (or with one it does not), or
            a tensor whose shape does not fit its module (naming the key and both shapes).
        UnsupportedError: an ``act_fn`` peftc does not compute, a config field peftc does not know,
            or a target that is not ``nn.Linear``.
    """
    cfg = source.config
    common.check_number(source, "r", "depth", "scaling")
    value = {k: FIELDS.defaults[k] if cfg.get(k) is None else cfg[k] for k in FIELDS.defaults}
    r = common.check_rank(source, "every target", value["r"])
    depth, act_fn, scaling = value["depth"], value["act_fn"], float(value["scaling"])
    if depth != int(depth) or depth < 0:
        raise InputError(f"{source.config_path}: depth={depth!r}; it must be a non-negative integer")
    if act_fn not in ACTIVATIONS:
        raise UnsupportedError(
            f"{source.config_path}: act_fn={act_fn!r} is not one peftc computes; supported: {', '.join(ACTIVATIONS)}"
        )
    depth = int(depth)

    def build(module: per_module.Module, warnings: list[str]) -> list[Site]:
        layers = [f"peanut_{s}.{k}" for s in ("encoders", "decoders") for k in range(depth)]
        shapes = {"peanut_A": (r, module.d_out), "peanut_B": (module.d_out, r)} | dict.fromkeys(layers, (r, r))
        extra = next((t for role, t in module.tensors.items() if role not in shapes), None)
        if extra is not None:
            raise InputError(f"{source.describe(extra.key)}: depth={depth}, so PEFT creates no such layer")
        per_module.require(source, module, shapes, f"r={r}, depth={depth}")
        tensors = {"peanut_A": module.tensors["peanut_A"], "peanut_B": module.tensors["peanut_B"]}
        for stack in ("encoders", "decoders"):
            parts = [module.tensors[f"peanut_{stack}.{k}"] for k in range(depth)]
            key = " + ".join(p.key for p in parts)  # the stacked tensor names every key it holds
            tensors[f"peanut_{stack}"] = AdapterTensor(key, torch.stack([p.tensor for p in parts])) if parts else None
        info = {"module_type": module.info.class_name, "r": r, "depth": depth, "act_fn": act_fn}
        scalars = {"scaling": scaling, "act_fn": act_fn}
        return [Site(module.path, PEANUT_WEIGHT.name, tensors, scalars, info, "weight")]

    return per_module.parse(
        source,
        modules,
        peft_type="PEANUT",
        title="PEANuT",
        fields=FIELDS,
        roles=_role,
        types=per_module.LINEAR_TYPES,
        build=build,
        bias_field=None,
    )


METHOD = Method("peanut", ("PEANUT",), parse, ops=(PEANUT_WEIGHT,), fields=FIELDS)
