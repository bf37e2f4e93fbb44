"""UniLoRA (PEFT ``UNILORA``): its weight transform and peftc's parser.

UniLoRA trains one vector ``θ`` ``[theta_d_length]`` for the whole adapter. Every entry of every LoRA
factor reads one entry of ``θ``, through a fixed index, times a fixed scale::

    A = θ[I_A] ⊙ S_A      [r, d_in]          B = θ[I_B] ⊙ S_B      [d_out, r]
    ΔW = B · A

PEFT's forward adds ``(x Aᵀ) Bᵀ`` with the same ``A`` and ``B``, so it and the merge agree. There is
no other scale. GPT-2's ``Conv1D`` stores ``W`` as ``[d_in, d_out]``, so ``ΔW`` is added transposed.
The update is formed in fp32 and added to ``W``; the result has ``W``'s dtype. The gathers lower to
ONNX ``Gather``.

**Indices and scales.** With ``save_indices`` the file holds ``I`` and ``S`` for each target. Without
them PEFT deals them again when it loads the adapter, and so does peftc, the same way: the targets in
module declaration order (``peftc/methods/model_order.py``), each taking ``r·d_in`` positions for
``I_A`` then ``d_out·r`` for ``I_B`` from one balanced stream over ``θ`` — every index
``⌊n / D⌋`` times, plus ``n mod D`` distinct extras drawn by NumPy's ``default_rng(proj_seed)``, the
whole shuffled by the same generator — and every position scaled by ``1/√(times its index occurs)``.
Targets the traced program never runs are refused then (PEFT deals them a share too).

**Adapter files.** Keys: the shared ``base_model.unilora_theta_d``; with ``save_indices``,
``<m>.unilora_indices_A``/``_B`` (integers) and ``<m>.unilora_scales_A``/``_B`` per target
(``nn.Linear`` or GPT-2 ``Conv1D``, as in PEFT). Each target becomes one ``unilora_weight`` site on its
weight; trained biases (``bias``) and ``modules_to_save`` tensors are full replacements.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, model_order
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

UNILORA_WEIGHT = SiteOp(
    name="unilora_weight",
    form="weight",
    tensor_roles=("unilora_theta_d", "unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
    scalars=("layout",),
)


def delta_weight(
    theta: torch.Tensor,
    indices_a: torch.Tensor,
    indices_b: torch.Tensor,
    scales_a: torch.Tensor,
    scales_b: torch.Tensor,
) -> torch.Tensor:
    """``B · A`` ``[d_out, d_in]`` in fp32 (module docstring)."""
    theta = theta.to(torch.float32)
    a = theta[indices_a] * scales_a.to(torch.float32)
    b = theta[indices_b] * scales_b.to(torch.float32)
    return b @ a


@composite_op(
    "unilora_weight(Tensor weight, Tensor unilora_theta_d, Tensor unilora_indices_a, Tensor unilora_indices_b, "
    "Tensor unilora_scales_a, Tensor unilora_scales_b, str layout) -> Tensor"
)
def unilora_weight(
    weight: torch.Tensor,
    unilora_theta_d: torch.Tensor,
    unilora_indices_a: torch.Tensor,
    unilora_indices_b: torch.Tensor,
    unilora_scales_a: torch.Tensor,
    unilora_scales_b: torch.Tensor,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    delta = delta_weight(unilora_theta_d, unilora_indices_a, unilora_indices_b, unilora_scales_a, unilora_scales_b)
    return (weight.to(torch.float32) + (delta.T if layout == "linear_t" else delta)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "theta_d_length",
        "proj_seed",
        "save_indices",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "unilora_dropout": "dropout is the identity at inference",
        "init_theta_d_bound": "initialisation only (the trained vector is in the file)",
        "init_weights": "initialisation only (the trained vector is in the file)",
    },
    defaults={"r": 4, "theta_d_length": 256, "proj_seed": 42, "save_indices": False, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
THETA = "base_model.unilora_theta_d"
ROLES = {f"unilora_{kind}_{side}": f"{kind}_{side}" for kind in ("indices", "scales") for side in "AB"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a UniLoRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a missing or misshapen ``θ``, indices or scales
            missing (``save_indices=true``) or shaped unlike the module's factors, or an index
            outside ``θ`` (the message names the key and both shapes).
        UnsupportedError: a config field peftc does not know, a target that is not a linear layer,
            or, when indices are dealt again, a target the program does not run.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "UNILORA", FIELDS)
    common.check_number(source, "r", "theta_d_length", "proj_seed")
    if cfg.get("bias", "none") not in ("none", "all", "unilora_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'unilora_only'")
    r = common.positive_int(source, "r", 4)
    length = common.positive_int(source, "theta_d_length", 256)
    if THETA not in source.tensors:
        raise InputError(f"{source.weights_path}: no {THETA} (the trained vector)")
    theta = AdapterTensor(THETA, source.tensors[THETA], shared=True)
    common.expect_shape(source, theta, (length,), f"[theta_d_length={length}]")

    rest = dataclasses.replace(source, tensors={k: v for k, v in source.tensors.items() if k != THETA})
    grouped = common.group_keys(rest, modules, common.suffix_roles(ROLES))
    targeted = common.targeted_modules(cfg, modules)
    saved = bool(cfg.get("save_indices", False))
    unused = list(grouped.unused)
    if not saved:  # PEFT deals indices again and ignores any in the file; every target is a site
        common.check_modules(source, grouped, modules, targeted & set(grouped.modules))
        why = "save_indices=false: PEFT deals the indices and scales again and ignores saved ones"
        unused += [(t.key, why) for tensors in grouped.modules.values() for t in tensors.values()]
        grouped.modules = {path: {} for path in targeted}
    common.check_modules(source, grouped, modules, targeted)
    dims = {}
    for path in grouped.modules:
        layout = common.layout(source, modules[path], "UniLoRA", TYPES)
        dims[path] = (*common.io_dims(modules, modules[path], layout), layout)
    if saved:
        factors = {path: _saved(source, path, grouped.modules[path], r, dims[path][:2], length) for path in dims}
    else:
        factors = _dealt(source, modules, dims, r, length)

    sites = []
    for path in sorted(dims):
        site_tensors = {role: factors[path].get(role, theta) for role in UNILORA_WEIGHT.tensor_roles}
        info = {"module_type": modules[path].class_name, "r": r}
        sites.append(Site(path, UNILORA_WEIGHT.name, site_tensors, {"layout": dims[path][2]}, info, "weight"))
    return common.adapter(source, "unilora", sites, grouped, honoured, ignored, unused=unused)


def _saved(
    source: AdapterSource,
    path: str,
    tensors: dict[str, AdapterTensor],
    r: int,
    io: tuple[int, int],
    length: int,
) -> dict[str, AdapterTensor]:
    d_in, d_out = io
    common.require_roles(source, path, tensors, ROLES.values())
    out = {}
    for side, shape in (("A", (r, d_in)), ("B", (d_out, r))):
        what = f"[{shape[0]}, {shape[1]}] ({'r, d_in' if side == 'A' else 'd_out, r'}) for {path!r}"
        indices, scales = tensors[f"indices_{side}"], tensors[f"scales_{side}"]
        common.expect_shape(source, indices, shape, what)
        common.expect_shape(source, scales, shape, what)
        values = indices.tensor
        if not values.is_floating_point() and values.numel() and (int(values.min()) < 0 or int(values.max()) >= length):
            raise InputError(f"{source.describe(indices.key)}: an index outside theta_d of length {length}")
        out[f"unilora_indices_{side}"] = dataclasses.replace(indices, index=True)
        out[f"unilora_scales_{side}"] = scales
    return out


def deal(count: int, length: int, seed: int) -> torch.Tensor:
    """PEFT's balanced stream of ``count`` indices into ``θ`` (module docstring)."""
    rng = np.random.default_rng(seed)
    stream = np.repeat(np.arange(length), count // length)
    if count % length:
        stream = np.concatenate([stream, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(stream)
    return torch.as_tensor(stream, dtype=torch.int64)


def _dealt(
    source: AdapterSource, modules: ModuleTable, dims: dict[str, tuple[int, int, str]], r: int, length: int
) -> dict[str, dict[str, AdapterTensor]]:
    """Indices and scales dealt as PEFT deals them when the file has none."""
    cfg = source.config
    where = str(source.config_path)
    model_order.refuse_untraced(cfg, modules, where, "deals it a share of the indices (save_indices=false)")
    order = model_order.declaration_order(modules, dims)
    seed = int(cfg.get("proj_seed", 42))
    stream = deal(sum(r * (d_in + d_out) for d_in, d_out, _ in dims.values()), length, seed)
    counts = torch.bincount(stream, minlength=length)
    inverse = torch.zeros(length)
    inverse[counts > 0] = counts[counts > 0].float().rsqrt()
    out, start = {}, 0
    for path in order:
        d_in, d_out, _ = dims[path]
        factors = {}
        for side, shape in (("A", (r, d_in)), ("B", (d_out, r))):
            indices = stream[start : start + shape[0] * shape[1]].view(shape).clone()
            start += indices.numel()
            key = f"unilora_{{}}_{side} of {path!r} dealt from proj_seed={seed}"
            factors[f"unilora_indices_{side}"] = AdapterTensor(key.format("indices"), indices, index=True)
            factors[f"unilora_scales_{side}"] = AdapterTensor(key.format("scales"), inverse[indices])
        out[path] = factors
    return out


METHOD = Method("unilora", ("UNILORA",), parse, ops=(UNILORA_WEIGHT,), fields=FIELDS)
