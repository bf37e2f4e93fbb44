"""TinyLoRA (PEFT ``TINYLORA``): its weight transform and peftc's parser.

TinyLoRA is LoRA-XS with its ``r×r`` core made from a tiny trained vector: each module keeps frozen
factors of its own weight's truncated SVD, ``B = U_r √S_r`` ``[d_out, r]`` and ``A = √S_r V_rᵀ``
``[r, d_in]`` (``r`` = ``min(r, d_out, d_in)``), a frozen random tensor ``P`` ``[u, r, r]``, and reads
a trained ``v`` ``[u]`` that ``weight_tying`` may share between modules::

    R = Σ_i v[i] · P[i]          ΔW = B · R · A

PEFT's forward adds ``((x Aᵀ) Rᵀ) Bᵀ`` on linear layers and ``B[ids] · R · A`` on embeddings (rows
``[num_embeddings, r]``, columns ``[r, embedding_dim]``), the same ``ΔW`` its merge adds. GPT-2's
``Conv1D`` stores ``W`` as ``[d_in, d_out]``, so ``ΔW`` is added transposed there. The update is
formed in fp32 and cast back to ``W``'s dtype.

**Which v, which P.** PEFT numbers the targets (``nn.Linear``, ``Conv1D``, ``nn.Embedding``) in module
declaration order (``peftc/methods/model_order.py``), ``i = 0…n−1``. Target ``i`` reads
``v[min(i // size, groups − 1)]`` with ``groups = max(1, round(n·(1 − weight_tying)))`` and
``size = max(1, n // groups)``. Its ``P`` is saved with ``save_projection``; otherwise (or when a
saved one is missing, as PEFT warns) PEFT draws it again when it loads the adapter, and so does
peftc, the same way: ``torch.normal(0, 1/√r, (u, r, r))`` from a CPU generator seeded with
``projection_seed + i``. A target the traced program never runs also takes a number; its keys then
name a module the program does not execute, which the parser refuses.

**Adapter files.** Keys: ``<m>.tinylora_A``, ``<m>.tinylora_B`` (the SVD factors, always saved),
``<m>.tinylora_P`` (with ``save_projection``) per target, and ``base_model.tinylora_v.<group>``. Each
target becomes one ``tinylora_weight`` site on its weight (``v`` copied to each site that reads it);
trained biases (``bias``) and ``modules_to_save`` tensors are full replacements. Refused: embeddings
with ``max_norm`` (their lookup renormalises the merged rows, which PEFT's forward does not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, model_order
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

TINYLORA_WEIGHT = SiteOp(
    name="tinylora_weight",
    form="weight",
    tensor_roles=("tinylora_A", "tinylora_B", "tinylora_P", "tinylora_v"),
    scalars=("layout",),
)


def delta_weight(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``B · (Σ_i v[i] P[i]) · A`` in fp32, ``[rows, columns]`` of the weight's matrix (module docstring)."""
    core = (v.to(torch.float32)[:, None, None] * p.to(torch.float32)).sum(0)
    return b.to(torch.float32) @ core @ a.to(torch.float32)


@composite_op(
    "tinylora_weight(Tensor weight, Tensor tinylora_a, Tensor tinylora_b, Tensor tinylora_p, Tensor tinylora_v, "
    "str layout) -> Tensor"
)
def tinylora_weight(
    weight: torch.Tensor,
    tinylora_a: torch.Tensor,
    tinylora_b: torch.Tensor,
    tinylora_p: torch.Tensor,
    tinylora_v: torch.Tensor,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear``, ``linear_t`` or ``embedding`` weight (fp32 math)."""
    delta = delta_weight(tinylora_a, tinylora_b, tinylora_p, tinylora_v)
    return (weight.to(torch.float32) + (delta.T if layout == "linear_t" else delta)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "u",
        "weight_tying",
        "projection_seed",
        "save_projection",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "tinylora_dropout": "dropout is the identity at inference",
        "init_v_bound": "initialisation only (the trained v is in the file)",
        "init_weights": "initialisation only (the trained v is in the file)",
    },
    defaults={"r": 2, "u": 64, "weight_tying": 0.0, "projection_seed": 42, "save_projection": True, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D", "Embedding")
V_PREFIX = "base_model.tinylora_v."
ROLES = {"tinylora_A": "A", "tinylora_B": "B", "tinylora_P": "P"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a TinyLoRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module or one the program does not run (PEFT numbers it
            too), a targeted module without its factors, a missing
            ``v`` group, a factor, projection or ``v`` whose shape does not fit (naming key and shapes),
            or a ``weight_tying`` outside [0, 1].
        UnsupportedError: a config field peftc does not know, a target of another type, or an
            embedding with ``max_norm``.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "TINYLORA", FIELDS)
    common.check_number(source, "r", "u", "weight_tying", "projection_seed")
    if cfg.get("bias", "none") not in ("none", "all", "tinylora_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'tinylora_only'")
    r = common.positive_int(source, "r", 2)
    u = common.positive_int(source, "u", 64)
    tying = float(cfg.get("weight_tying", 0.0))
    if not 0.0 <= tying <= 1.0:
        raise InputError(f"{source.config_path}: weight_tying={tying}; it must lie in [0, 1]")

    vectors = {k: v for k, v in source.tensors.items() if k.startswith(V_PREFIX)}
    rest = dataclasses.replace(source, tensors={k: v for k, v in source.tensors.items() if k not in vectors})
    grouped = common.group_keys(rest, modules, common.suffix_roles(ROLES))
    common.check_modules(source, grouped, modules, common.targeted_modules(cfg, modules))
    order = model_order.declaration_order(modules, grouped.modules)
    groups = max(1, round(len(order) * (1.0 - tying)))
    size = max(1, len(order) // groups)

    warnings, sites = [], []
    for index, path in enumerate(order):
        module, tensors = modules[path], grouped.modules[path]
        layout = common.layout(source, module, "TinyLoRA", TYPES)
        if layout == "embedding" and any("renorm" in str(n.target) for c in module.calls for n in c.nodes):
            raise UnsupportedError(
                f"{source.config_path.name}: TinyLoRA on embedding {path!r} with max_norm (the lookup renormalises "
                "merged rows, which PEFT's forward does not)"
            )
        rows, cols = _matrix_shape(modules, module, layout)
        rank = min(r, rows, cols)
        common.require_roles(source, path, tensors, ["A", "B"])
        common.expect_shape(source, tensors["A"], (rank, cols), f"[r={rank}, {cols}] for {path!r}")
        common.expect_shape(source, tensors["B"], (rows, rank), f"[{rows}, r={rank}] for {path!r}")
        p = tensors.get("P") if cfg.get("save_projection", True) else None
        if p is None:
            p = _redrawn(cfg, index, u, rank, path)
            warnings.append(
                f"{path}: tinylora_P drawn again from projection_seed + {index}, as PEFT does when it loads"
            )
        common.expect_shape(source, p, (u, rank, rank), f"[u={u}, r={rank}, r={rank}] for {path!r}")
        group = str(min(index // size, groups - 1))
        v = _vector(source, vectors, group, u, path)
        site_tensors = {"tinylora_A": tensors["A"], "tinylora_B": tensors["B"], "tinylora_P": p, "tinylora_v": v}
        info = {"module_type": module.class_name, "r": rank, "group": int(group)}
        sites.append(Site(path, TINYLORA_WEIGHT.name, site_tensors, {"layout": layout}, info, "weight"))
    unused = list(grouped.unused)
    if not cfg.get("save_projection", True):
        why = "save_projection=false: PEFT draws P again and ignores a saved one"
        unused += [(t["P"].key, why) for t in grouped.modules.values() if "P" in t]
    read = {site.tensors["tinylora_v"].key for site in sites}
    unused += [(k, "a v group no target reads (PEFT does not load it either)") for k in sorted(set(vectors) - read)]
    return common.adapter(source, "tinylora", sites, grouped, honoured, ignored, warnings, unused=unused)


def _matrix_shape(modules: ModuleTable, module, layout: str) -> tuple[int, int]:
    """``(rows, columns)`` of ``ΔW`` before any transpose: B's rows and A's columns."""
    shape = modules.state_shapes[module.params["weight"]]
    return (shape[1], shape[0]) if layout == "linear_t" else (shape[0], shape[1])


def _vector(source: AdapterSource, vectors: dict[str, torch.Tensor], group: str, u: int, path: str) -> AdapterTensor:
    key = V_PREFIX + group
    if key not in vectors:
        raise InputError(f"{source.weights_path}: no {key}, the v of group {group} that {path!r} reads")
    tensor = AdapterTensor(key, vectors[key])
    common.expect_shape(source, tensor, (u,), f"[u={u}]")
    return tensor


def _redrawn(cfg: Mapping[str, Any], index: int, u: int, rank: int, path: str) -> AdapterTensor:
    seed = int(cfg.get("projection_seed", 42)) + index
    generator = torch.Generator().manual_seed(seed)
    p = torch.normal(mean=0.0, std=1.0 / (rank**0.5), size=(u, rank, rank), generator=generator)
    return AdapterTensor(f"tinylora_P of {path!r} drawn from seed {seed}", p)


METHOD = Method("tinylora", ("TINYLORA",), parse, ops=(TINYLORA_WEIGHT,), fields=FIELDS)
