"""FRoD (PEFT ``FROD``): its weight form and peftc's parser.

FRoD writes a linear layer's weight (``[d_out, d_in]``; GPT-2's ``Conv1D`` transposed) as::

    W' = U · (S + diag(λ)) · Vᵀ

with ``V`` ``[d_in, d_in]`` a basis shared by the modules of one *category* (the last two path
segments, e.g. ``self_query``), ``S`` a sparse ``[d_in, d_in]`` matrix of trained values ``s`` at
fixed off-diagonal positions (repeated positions add up, as PEFT's coalesced COO tensor does),
``λ`` ``[d_in]`` trained, and ``U`` fixed when PEFT loads the adapter, from the base weight::

    B = W V⁻ᵀ (float64),   λ₀ = ‖columns of B‖,   U = B / λ₀  (columns with λ₀ ≤ 1e-12 are zero)

so that ``W' = W`` at initialisation. PEFT's merge replaces ``W`` by exactly this ``W'``, and its
unmerged forward computes ``x V (Sᵀ + diag(λ)) Uᵀ`` (+ bias), the same function (checked against
PEFT's layers in the tests). peftc computes ``U`` the same way at parse time (float64, then fp32 as
PEFT keeps it), from the file's ``V``: PEFT uses the ``V`` it rebuilds from the base weights when it
creates the layer, equal to the saved one on the base the adapter was trained on. ``U`` depends on
the base weight, so a FRoD adapter may not follow another adapter of the same module in a stack
(refused by ``insert-sites``: PEFT would derive ``U`` from the merged weight). ``W'`` is formed in
fp32 and has ``W``'s dtype.

**Adapter files.** Per category ``c``: ``base_model.frod_V.c`` ``[d_in, d_in]``,
``base_model.frod_s_indices.c`` ``[2, nnz]`` (integer; read as int64, recorded as ``<key> as
int64``) and ``base_model.frod_s_size.c`` ``[2]`` (``[d_in, d_in]``; checked, then recorded unused), saved
with ``save_projection``; without them PEFT rebuilds them when it loads the adapter, from a
decomposition of every targeted base weight and ``projection_prng_key``, and so does peftc, the same
way (``peftc/methods/frod_rebuild.py``), with a warning. Per target (``nn.Linear`` or ``Conv1D``, as in PEFT):
``<m>.frod_lambda_l`` ``[d_in]`` and ``<m>.frod_lambda_s_values`` ``[nnz]``. Trained biases
(``bias``) and ``modules_to_save`` tensors are full replacements. Each target becomes one
``frod_weight`` site on its weight.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, frod_rebuild, per_module
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

FROD_WEIGHT = SiteOp(
    name="frod_weight",
    form="weight",
    tensor_roles=("frod_U", "frod_V", "frod_s_indices", "frod_lambda_s_values", "frod_lambda_l"),
    scalars=("layout",),
)
PROJECTIONS = ("frod_V", "frod_s_indices", "frod_s_size")
FROD_TYPES = (*per_module.LINEAR_TYPES, "Conv1D")
BASE_DERIVED = "FRoD's U is derived from the base weight when the adapter is loaded"
"""``Site.info`` note that makes ``insert-sites`` refuse an earlier adapter on the same module."""


def sparse(indices: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """The dense ``[size, size]`` fp32 matrix with ``values`` added at ``indices`` ``[2, nnz]``."""
    dense = torch.zeros(size, size, dtype=torch.float32)
    return dense.index_put((indices[0].to(torch.int64), indices[1].to(torch.int64)), values.to(torch.float32), True)


@composite_op(
    "frod_weight(Tensor weight, Tensor frod_u, Tensor frod_v, Tensor s_indices, Tensor s_values, Tensor lambda_l, "
    "str layout) -> Tensor"
)
def frod_weight(
    weight: torch.Tensor,
    frod_u: torch.Tensor,
    frod_v: torch.Tensor,
    s_indices: torch.Tensor,
    s_values: torch.Tensor,
    lambda_l: torch.Tensor,
    layout: str,
) -> torch.Tensor:
    """``U (S + diag λ) Vᵀ`` in ``weight``'s layout and dtype (``weight`` itself is replaced, not read)."""
    core = sparse(s_indices, s_values, frod_v.shape[0]) + torch.diag(lambda_l.to(torch.float32))
    adapted = frod_u.to(torch.float32) @ core @ frod_v.to(torch.float32).T
    return from_out_in(adapted, weight, layout).to(weight.dtype)


def basis_factor(weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PEFT's ``U`` for a base ``weight`` ``[d_out, d_in]`` and basis ``v`` (float64, returned as fp32)."""
    w, v = weight.detach().to(torch.float64), v.detach().to(torch.float64)
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:  # a singular basis: PEFT's fallback
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    kept = norms > 1e-12
    u[:, kept] = b[:, kept] / norms[kept]
    return u.float()


def category(path: str) -> str:
    """The projection-sharing category PEFT gives a module path (its last two segments, mostly)."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    name = f"{parts[-2]}_{parts[-1]}"
    return "attention_output" if name == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" else name


FIELDS = common.Fields(
    honoured=(
        "save_projection",
        "projection_prng_key",
        "sparse_rate",
        "regularization_alpha",
        "fan_in_fan_out",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "frod_dropout": "dropout is the identity at inference",
        "init_weights": "initialisation only (the trained values are in the file)",
        "progressbar": "display only",
        "runtime_offload_base_weight": "device placement only",
    },
    defaults={"save_projection": True, "bias": "none"},
)
ROLES = {"frod_lambda_l": "frod_lambda_l", "frod_lambda_s_values": "frod_lambda_s_values"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a FRoD adapter against the base model's modules.

    Raises:
        InputError: a projection missing or shaped unlike PEFT's for its category, sparse positions
            that are not integers or fall outside ``V``, a key for no targeted module, a target
            without its trained vectors, a shape that does not fit the module (naming key and shapes),
            or a base weight the program does not hold.
        UnsupportedError: a config field peftc does not know, or a target that is neither
            ``nn.Linear`` nor ``Conv1D``.
    """
    cfg = source.config
    common.check_number(source, "projection_prng_key", "sparse_rate", "regularization_alpha")
    prefixes = tuple(f"base_model.{p}." for p in PROJECTIONS)
    saved = {k: v for k, v in source.tensors.items() if k.startswith(prefixes)}
    rest = dataclasses.replace(source, tensors={k: v for k, v in source.tensors.items() if k not in saved})
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    used: set[str] = set()
    rebuilt = None if cfg.get("save_projection", True) else _rebuilt(source, modules)

    def build(module: per_module.Module, warnings: list[str]) -> list[Site]:
        d_in = module.d_in
        if rebuilt is None:
            v, s_indices = _projections(source, saved, category(module.path), d_in, used)
        else:
            v, s_indices = rebuilt[category(module.path)]
            if REBUILT not in warnings:
                warnings.append(REBUILT)
        nnz = s_indices.tensor.shape[1]
        shapes = {"frod_lambda_l": (d_in,), "frod_lambda_s_values": (nnz,)}
        per_module.require(source, module, shapes, f"category {category(module.path)!r} with {nnz} sparse entries")
        weight = modules.tensors.get(module.info.params["weight"])
        if weight is None:
            raise InputError(
                f"{source.config_path}: FRoD's U for {module.path!r} needs the base weight, which is not held"
            )
        per_module.note_fan_in_fan_out(fan_in_fan_out, module, warnings)
        w = as_out_in(weight, module.layout)
        u = AdapterTensor(f"U of {module.path} from the base weight and {v.key}", basis_factor(w, v.tensor))
        tensors = {"frod_U": u, "frod_V": v, "frod_s_indices": s_indices, **module.tensors}
        info = {"module_type": module.info.class_name, "category": category(module.path), "sparse_entries": nnz}
        info["base_weight_derived"] = BASE_DERIVED
        return [Site(module.path, FROD_WEIGHT.name, tensors, {"layout": module.layout}, info, "weight")]

    adapter = per_module.parse(
        rest,
        modules,
        peft_type="FROD",
        title="FRoD",
        fields=FIELDS,
        roles=ROLES,
        types=FROD_TYPES,
        build=build,
        bias_modes=("none", "all", "frod_only"),
    )
    why = "a projection of a category no targeted module belongs to; PEFT does not use it"
    if rebuilt is not None:
        why = "save_projection=false: PEFT ignores saved projections and rebuilds them"
    unused = [(k, why) for k in sorted(saved) if k not in used]
    size = "the sparse matrix's size, implied by V (checked against it)"
    unused += [(k, size) for k in sorted(used) if k.startswith("base_model.frod_s_size.")]
    return dataclasses.replace(adapter, source=source, unused=(*adapter.unused, *unused))


REBUILT = (
    f"save_projection=false: FRoD's bases and sparse positions rebuilt from the base weights and projection_prng_key "
    f"with torch {torch.__version__}'s decompositions and CPU generator, as PEFT does when it loads the adapter; this "
    "matches the training run only if its torch computed the same numbers (save_projection=true avoids the doubt)"
)


def _rebuilt(source: AdapterSource, modules: ModuleTable) -> dict[str, tuple[AdapterTensor, AdapterTensor]]:
    """Every category's ``(V, positions)`` rebuilt as PEFT does (``peftc/methods/frod_rebuild.py``)."""
    cfg = source.config
    targets = [p for p in modules if p in common.targeted_modules(cfg, modules)]
    targets = [p for p in targets if modules[p].class_name in FROD_TYPES and "weight" in modules[p].params]
    missing = next((p for p in targets if modules[p].params["weight"] not in modules.tensors), None)
    if missing is not None:
        raise InputError(
            f"{source.config_path}: rebuilding FRoD's bases needs the base weight of {missing!r}, not held"
        )
    seed = int(cfg.get("projection_prng_key") or 0)
    rate = 0.01 if cfg.get("sparse_rate") is None else float(cfg["sparse_rate"])
    alpha = 1e-3 if cfg.get("regularization_alpha") is None else float(cfg["regularization_alpha"])
    categories = {p: category(p) for p in targets}
    out = {}
    for name, (v, indices) in frod_rebuild.rebuild(modules, targets, categories, seed, rate, alpha).items():
        how = f"rebuilt from the base weights (category {name!r})"
        drawn = f"drawn from projection_prng_key={seed} (category {name!r})"
        out[name] = (AdapterTensor(f"frod_V {how}", v), AdapterTensor(f"frod_s_indices {drawn}", indices))
    return out


def _projections(
    source: AdapterSource, saved: dict[str, torch.Tensor], name: str, d_in: int, used: set[str]
) -> tuple[AdapterTensor, AdapterTensor]:
    """The category's basis ``V`` and sparse positions (as int64), checked against its modules' inputs."""
    keys = {p: f"base_model.{p}.{name}" for p in PROJECTIONS}
    for key in keys.values():
        if key not in saved:
            raise InputError(f"{source.weights_path}: save_projection=true but the file has no {key}")
    used.update(keys.values())
    v = AdapterTensor(keys["frod_V"], saved[keys["frod_V"]])  # per category: not one tensor of the whole adapter
    common.expect_shape(source, v, (d_in, d_in), f"[{d_in}, {d_in}] (the inputs of category {name!r})")
    size = saved[keys["frod_s_size"]]
    if size.tolist() != [d_in, d_in]:
        raise InputError(f"{source.describe(keys['frod_s_size'])}: {size.tolist()}; expected [{d_in}, {d_in}]")
    indices = saved[keys["frod_s_indices"]]
    where = source.describe(keys["frod_s_indices"])
    if indices.is_floating_point() or indices.dim() != 2 or indices.shape[0] != 2:
        raise InputError(f"{where}: shape {list(indices.shape)} {indices.dtype}; expected integer positions [2, nnz]")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= d_in):
        raise InputError(f"{where}: positions outside [0, {d_in})")
    return v, AdapterTensor(f"{keys['frod_s_indices']} as int64", indices.to(torch.int64))


METHOD = Method("frod", ("FROD",), parse, ops=(FROD_WEIGHT,), fields=FIELDS)
