"""DEFT, decompositional efficient fine-tuning (PEFT ``DEFT``): its weight transform and peftc's parser.

DEFT removes a trained rank-``r`` subspace from the output side of the weight and injects a trained
replacement. From ``P`` ``[d_out, r]`` it forms ``(Q, K)`` with the projector ``Q·Kᵀ``::

    decomposition_method="relu":  Q = P,             K = relu(P)        (not orthogonal)
    decomposition_method="qr":    Q = qr(P).Q,       K = Q              (reduced QR, torch.linalg.qr)

and, with ``W`` the logical ``[d_out, d_in]`` weight (GPT-2's ``Conv1D`` stores it transposed)::

    W' = (I − Q Kᵀ) W + s · Q R  =  W + Q (s·R − Kᵀ W)          (R [r, d_in]; s = alpha / r, or 1 unset)
    para=True (PaRa, no R):          W' = W − Q (Kᵀ W)

with ``r = min(config r, d_out)`` per module, as PEFT caps it (``s`` uses that ``r`` too). PEFT's
``forward`` subtracts ``((x Wᵀ) K) Qᵀ`` from the base output (bias removed first) and adds
``(x (sR)ᵀ) Qᵀ``; its ``merge`` adds the same update to ``W`` (measured 1e-7 relative apart on a small
model).

The QR factor is computed when the adapter is parsed (fp32, ``torch.linalg.qr`` on CPU, as PEFT
computes it from the loaded ``P``): ONNX has no QR, and ``Q`` depends only on the file. Its column
signs are LAPACK's; PEFT on the same machine gets the same ones, but ``Q R`` depends on them, so a
warning says the result matches training only where the training run's QR chose the same signs. The
update is formed in fp32 and cast back.

**Adapter files.** Keys ``<m>.deft_P`` ``[d_out, r]`` and (unless ``para``) ``<m>.deft_R``
``[r, d_in]`` per ``nn.Linear`` or GPT-2 ``Conv1D`` target (the types PEFT's DEFT adapts); trained
biases (``bias``) and ``modules_to_save`` tensors are full replacements. Each target becomes one ``deft_weight`` site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

DEFT_WEIGHT = SiteOp(
    name="deft_weight", form="weight", tensor_roles=("deft_Q", "deft_R"), scalars=("relu", "scale", "layout")
)


def delta_weight(q: torch.Tensor, r: torch.Tensor | None, relu: bool, scale: float, w: torch.Tensor) -> torch.Tensor:
    """``Q (s·R − Kᵀ W)`` (``−Q Kᵀ W`` without ``R``) in fp32 for the logical weight ``w`` ``[d_out, d_in]``."""
    q = q.to(torch.float32)
    k = torch.relu(q) if relu else q
    removed = k.T @ w
    return q @ (r.to(torch.float32) * scale - removed) if r is not None else -(q @ removed)


@composite_op("deft_weight(Tensor weight, Tensor deft_q, Tensor? deft_r, bool relu, float scale, str layout) -> Tensor")
def deft_weight(
    weight: torch.Tensor, deft_q: torch.Tensor, deft_r: torch.Tensor | None, relu: bool, scale: float, layout: str
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    transposed = layout == "linear_t"
    w = weight.to(torch.float32)
    delta = delta_weight(deft_q, deft_r, relu, scale, w.T if transposed else w)
    return (w + (delta.T if transposed else delta)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "alpha",
        "decomposition_method",
        "para",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "deft_dropout": "dropout is the identity at inference",
        "init_scale": "initialisation only (the trained matrices are in the file)",
        "init_weights": "initialisation only (the trained matrices are in the file)",
        "fan_in_fan_out": "PEFT sets it from the layer type (True for GPT-2 Conv1D, False otherwise), as peftc does",
    },
    defaults={"r": 8, "alpha": None, "decomposition_method": "relu", "para": False, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
ROLES = {"deft_P": "deft_P", "deft_R": "deft_R"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a DEFT adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its matrices (or with an
            ``R`` under ``para``), a shape that does not fit the module and rank, or an unknown
            ``decomposition_method``.
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear`` or
            GPT-2 ``Conv1D``.
    """
    honoured, ignored = common.classify_fields(source, "DEFT", FIELDS)
    common.check_number(source, "r", "alpha")
    settings = {k: FIELDS.defaults[k] if honoured[k] is None else honoured[k] for k in FIELDS.defaults}
    settings["alpha"] = honoured["alpha"]
    where = source.config_path
    if source.config.get("target_modules") is None:
        raise InputError(f"{where}: DEFT config has no target_modules")
    if settings["decomposition_method"] not in ("relu", "qr"):
        raise InputError(f"{where}: decomposition_method={settings['decomposition_method']!r}; expected relu or qr")
    if settings["bias"] not in ("none", "all", "deft_only"):
        raise InputError(f"{where}: bias={settings['bias']!r}; expected 'none', 'all' or 'deft_only'")
    grouped = common.group_keys(source, modules, common.suffix_roles(ROLES))
    layouts = common.layouts(source, grouped, modules, "DEFT", TYPES)
    sites = [
        _site(source, modules, path, layouts[path], tensors, settings)
        for path, tensors in sorted(grouped.modules.items())
    ]
    warnings = []
    if settings["decomposition_method"] == "qr" and not settings["para"]:
        warnings.append(
            f"decomposition_method='qr': deft_P's QR factor computed with torch {torch.__version__} on CPU, as PEFT "
            "computes it; the injected Q·R is what training learnt only if the training run's QR chose the same "
            "column signs"
        )
    return common.adapter(source, "deft", sites, grouped, honoured, ignored, warnings)


def _site(
    source: AdapterSource,
    modules: ModuleTable,
    path: str,
    layout: str,
    tensors: Mapping[str, AdapterTensor],
    settings: Mapping[str, Any],
) -> Site:
    d_in, d_out = common.io_dims(modules, modules[path], layout)
    r = min(common.check_rank(source, path, settings["r"]), d_out)
    para = bool(settings["para"])
    if para and "deft_R" in tensors:
        raise InputError(
            f"{source.describe(tensors['deft_R'].key)}: para=true (PaRa) trains no R; PEFT would not load it"
        )
    common.require_roles(source, path, tensors, ["deft_P"] if para else ["deft_P", "deft_R"])
    what = f"(r=min({settings['r']}, d_out={d_out})) for {path!r}"
    common.expect_shape(source, tensors["deft_P"], (d_out, r), f"[{d_out}, {r}] {what}")
    if not para:
        common.expect_shape(source, tensors["deft_R"], (r, d_in), f"[{r}, {d_in}] {what}")
    q = tensors["deft_P"]
    relu = settings["decomposition_method"] == "relu"
    if not relu:
        factor, _ = torch.linalg.qr(q.tensor.detach().to(torch.float32))
        q = AdapterTensor(f"{q.key} (Q of its QR decomposition)", factor.contiguous())
    alpha = settings["alpha"]
    scale = float(alpha) / r if alpha else 1.0
    info = {"module_type": modules[path].class_name, "r": r, "decomposition": settings["decomposition_method"]}
    scalars = {"relu": relu, "scale": scale, "layout": layout}
    return Site(path, DEFT_WEIGHT.name, {"deft_Q": q, "deft_R": tensors.get("deft_R")}, scalars, info, "weight")


METHOD = Method("deft", ("DEFT",), parse, ops=(DEFT_WEIGHT,), fields=FIELDS)
