"""VeRA (PEFT ``VERA``): its weight transform and peftc's parser.

VeRA trains two vectors per module and shares two frozen random projections across all of them:
``A`` ``[r, d_in_max]`` and ``B`` ``[d_out_max, r]``, sized for the largest adapted module. A module
with ``d_in`` inputs and ``d_out`` outputs uses their leading slices::

    y = x Wᵀ + b + λ_b ⊙ (B[:d_out] (λ_d ⊙ (A[:, :d_in] x)))
    ⇔  W' = W + ΔW,   ΔW = (λ_b ⊙ B[:d_out]) · (λ_d ⊙ A[:, :d_in])     (λ_b scales rows, λ_d scales the r axis)

There is no α/r scale. GPT-2's ``Conv1D`` stores ``W`` as ``[d_in, d_out]`` (``fan_in_fan_out``), so
``ΔW`` is added transposed. The update is formed in fp32 and cast back to ``W``'s dtype.

**Adapter files.** Keys: ``<m>.vera_lambda_b`` ``[d_out]`` and ``<m>.vera_lambda_d`` ``[r]`` per
target (``nn.Linear`` or GPT-2 ``Conv1D``, as in PEFT), and the shared projections
``base_model.vera_A`` ``[r, d_in_max]`` and ``base_model.vera_B`` ``[d_out_max, r]``, sized for the
largest target, when ``save_projection`` is true. Without them PEFT redraws both from
``projection_prng_key`` when it loads the adapter, and so does peftc, the same way: a CPU
``torch.Generator`` seeded with the key draws ``A`` then ``B``, each Kaiming-uniform over its second
axis (bound ``√3·√2/√fan_in``). Saved projections that ``save_projection=false`` tells PEFT to
ignore are recorded as unused.

Each target becomes one ``vera_weight`` site on its weight (above) that reads the
shared projections; trained biases (``bias``) and ``modules_to_save`` tensors are full replacements.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

VERA_WEIGHT = SiteOp(
    name="vera_weight",
    form="weight",
    tensor_roles=("vera_A", "vera_B", "vera_lambda_b", "vera_lambda_d"),
    scalars=("layout",),
)


def delta_weight(
    vera_a: torch.Tensor,
    vera_b: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    d_out: int,
    d_in: int,
) -> torch.Tensor:
    """``(λ_b ⊙ B[:d_out]) · (λ_d ⊙ A[:, :d_in])`` in fp32, ``[d_out, d_in]``."""
    a = vera_a.to(torch.float32)[:, :d_in] * lambda_d.to(torch.float32)[:, None]
    b = vera_b.to(torch.float32)[:d_out] * lambda_b.to(torch.float32)[:, None]
    return b @ a


@composite_op(
    "vera_weight(Tensor weight, Tensor vera_a, Tensor vera_b, Tensor lambda_b, Tensor lambda_d, str layout) -> Tensor"
)
def vera_weight(
    weight: torch.Tensor,
    vera_a: torch.Tensor,
    vera_b: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    matrix = as_out_in(weight, layout).to(torch.float32)
    d_out, d_in = matrix.shape
    delta = delta_weight(vera_a, vera_b, lambda_b, lambda_d, d_out, d_in)
    return from_out_in(matrix + delta, weight, layout).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "projection_prng_key",
        "save_projection",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "vera_dropout": "dropout is the identity at inference",
        "d_initial": "initialisation only (the trained vectors are in the file)",
        "init_weights": "initialisation only (the trained vectors are in the file)",
    },
    defaults={"r": 256, "projection_prng_key": 0, "save_projection": True, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
PROJECTIONS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a VeRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its vectors, saved
            projections missing (``save_projection=true``) or shaped unlike PEFT's for this model, or
            a vector whose shape does not fit its module (the message names the key and both shapes).
        UnsupportedError: a config field peftc does not know, or a target that is not a linear layer.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "VERA", FIELDS)
    common.check_number(source, "r", "projection_prng_key")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: VeRA config has no target_modules")
    if cfg.get("bias", "none") not in ("none", "all", "vera_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'vera_only'")
    r = int(cfg.get("r", 256))
    if r <= 0:
        raise InputError(f"{source.config_path}: r={r}; it must be positive")

    saved = {key: source.tensors[key] for key in PROJECTIONS if key in source.tensors}
    rest = dataclasses.replace(source, tensors={k: v for k, v in source.tensors.items() if k not in saved})
    roles = common.suffix_roles({"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"})
    grouped = common.group_keys(rest, modules, roles)
    common.check_modules(source, grouped, modules, common.targeted_modules(cfg, modules))

    warnings: list[str] = []
    dims: dict[str, tuple[int, int, str]] = {}
    for path in sorted(grouped.modules):
        module = modules[path]
        layout = common.layout(source, module, "VeRA", TYPES)
        if bool(cfg.get("fan_in_fan_out", False)) != (layout == "linear_t"):
            warnings.append(
                f"fan_in_fan_out={cfg.get('fan_in_fan_out', False)} but {path!r} is a {module.class_name}; "
                f"using fan_in_fan_out={layout == 'linear_t'} as PEFT does"
            )
        dims[path] = (*common.io_dims(modules, module, layout), layout)
    d_in_max = max(d_in for d_in, _, _ in dims.values())
    d_out_max = max(d_out for _, d_out, _ in dims.values())

    unused = list(grouped.unused)
    if cfg.get("save_projection", True):
        projections = _saved(source, saved, r, d_in_max, d_out_max)
    else:
        unused += [(key, "save_projection=false: PEFT ignores saved projections and redraws them") for key in saved]
        projections = _redrawn(int(cfg.get("projection_prng_key", 0)), r, d_in_max, d_out_max)
        warnings.append(
            f"save_projection=false: vera_A/vera_B redrawn from projection_prng_key={cfg.get('projection_prng_key', 0)} "
            f"with torch {torch.__version__}'s CPU generator, as PEFT does when it loads the adapter; this matches "
            "the training run only if its torch drew the same numbers (save_projection=true avoids the doubt)"
        )

    sites = []
    for path, tensors in sorted(grouped.modules.items()):
        _, d_out, layout = dims[path]
        common.require_roles(source, path, tensors, ["lambda_b", "lambda_d"])
        weight = f"(weight {list(modules.state_shapes[modules[path].params['weight']])})"
        common.expect_shape(source, tensors["lambda_b"], (d_out,), f"[d_out={d_out}] for {path!r} {weight}")
        common.expect_shape(source, tensors["lambda_d"], (r,), f"[r={r}] for {path!r} {weight}")
        site_tensors = {**projections, "vera_lambda_b": tensors["lambda_b"], "vera_lambda_d": tensors["lambda_d"]}
        info = {"module_type": modules[path].class_name, "r": r}
        sites.append(Site(path, VERA_WEIGHT.name, site_tensors, {"layout": layout}, info, "weight"))
    return common.adapter(source, "vera", sites, grouped, honoured, ignored, warnings, unused=unused)


def _saved(
    source: AdapterSource, saved: dict[str, torch.Tensor], r: int, d_in_max: int, d_out_max: int
) -> dict[str, AdapterTensor]:
    """The projections from the file; PEFT loads them into buffers sized for this model, so the shapes must agree."""
    expected = {"vera_A": (r, d_in_max), "vera_B": (d_out_max, r)}
    out = {}
    for key, role in PROJECTIONS.items():
        if key not in saved:
            raise InputError(f"{source.weights_path}: save_projection=true but the file has no {key}")
        tensor = AdapterTensor(key, saved[key], shared=True)
        common.expect_shape(
            source,
            tensor,
            expected[role],
            f"{list(expected[role])} (r={r}; largest target d_in={d_in_max}, d_out={d_out_max})",
        )
        out[role] = tensor
    return out


def _redrawn(seed: int, r: int, d_in_max: int, d_out_max: int) -> dict[str, AdapterTensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for role, shape in (("vera_A", (r, d_in_max)), ("vera_B", (d_out_max, r))):  # drawn in this order
        bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))
        tensor = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        out[role] = AdapterTensor(f"{role} redrawn from projection_prng_key={seed}", tensor, shared=True)
    return out


METHOD = Method("vera", ("VERA",), parse, ops=(VERA_WEIGHT,), fields=FIELDS)
