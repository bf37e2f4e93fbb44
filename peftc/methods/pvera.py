"""PVeRA, probabilistic VeRA (PEFT ``PVERA``): its weight transform and peftc's parser.

PVeRA is VeRA whose down-projection yields a mean and a log-variance: it shares frozen random
projections ``A`` ``[2r, d_in_max]`` and ``B`` ``[d_out_max, r]`` and trains ``λ_b`` ``[d_out]`` and
``λ_d`` ``[2r]`` per module. PEFT's forward computes ``(μ, log σ²) = chunk₂(λ_d ⊙ (A[:, :d_in] x))``
and, at inference (``sample_at_inference=false``), adds ``λ_b ⊙ (B[:d_out] μ)``: only the first halves
of ``A`` and ``λ_d`` matter, and the update is VeRA's on them::

    W' = W + ΔW,   ΔW = (λ_b ⊙ B[:d_out]) · (λ_d[:r] ⊙ A[:r, :d_in])

which is also what PEFT's merge writes, so forward and merge agree. There is no α/r scale. GPT-2's
``Conv1D`` stores ``W`` as ``[d_in, d_out]``, so ``ΔW`` is added transposed. The update is formed in
fp32 and cast back to ``W``'s dtype.

Refused: ``sample_at_inference=true``, where PEFT's forward adds ``ε·σ`` with fresh Gaussian noise on
every call: the output is random, and PEFT's merge (the mean) is not what its forward computes.

**Adapter files.** Keys: ``<m>.pvera_lambda_b`` and ``<m>.pvera_lambda_d`` per target (``nn.Linear``
or GPT-2 ``Conv1D``, as in PEFT), and with ``save_projection`` the shared ``base_model.pvera_A`` and
``base_model.pvera_B``, sized for the largest target. Without them PEFT redraws both from
``projection_prng_key`` when it loads the adapter, and so does peftc, the same way: a CPU
``torch.Generator`` seeded with the key draws ``A`` then ``B``, Kaiming-uniform (``a=0``) over their
second axis. Saved projections that ``save_projection=false`` tells PEFT to ignore are recorded as
unused. Each target becomes one ``pvera_weight`` site on its weight; trained biases (``bias``) and
``modules_to_save`` tensors are full replacements.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, vera
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

PVERA_WEIGHT = SiteOp(
    name="pvera_weight",
    form="weight",
    tensor_roles=("pvera_A", "pvera_B", "pvera_lambda_b", "pvera_lambda_d"),
    scalars=("layout",),
)


def delta_weight(
    pvera_a: torch.Tensor,
    pvera_b: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    d_out: int,
    d_in: int,
) -> torch.Tensor:
    """``(λ_b ⊙ B[:d_out]) · (λ_d[:r] ⊙ A[:r, :d_in])`` in fp32, ``[d_out, d_in]`` (the mean's half)."""
    r = lambda_d.shape[0] // 2
    return vera.delta_weight(pvera_a[:r], pvera_b, lambda_b, lambda_d[:r], d_out, d_in)


@composite_op(
    "pvera_weight(Tensor weight, Tensor pvera_a, Tensor pvera_b, Tensor lambda_b, Tensor lambda_d, str layout) -> Tensor"
)
def pvera_weight(
    weight: torch.Tensor,
    pvera_a: torch.Tensor,
    pvera_b: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    matrix = as_out_in(weight, layout).to(torch.float32)
    d_out, d_in = matrix.shape
    delta = delta_weight(pvera_a, pvera_b, lambda_b, lambda_d, d_out, d_in)
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
        "pvera_dropout": "dropout is the identity at inference",
        "d_initial": "initialisation only (the trained vectors are in the file)",
        "init_weights": "initialisation only (the trained vectors are in the file)",
        "generator_seed": "seeds only the sampling that sample_at_inference turns on (refused when set)",
    },
    unsupported={
        "sample_at_inference": "PEFT's forward then adds fresh Gaussian noise on every call (a random output, "
        "which no compiled model reproduces; PEFT's merge keeps only the mean)",
    },
    defaults={"r": 256, "projection_prng_key": 0, "save_projection": True, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
PROJECTIONS = {"base_model.pvera_A": "pvera_A", "base_model.pvera_B": "pvera_B"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a PVeRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its vectors, saved
            projections missing (``save_projection=true``) or shaped unlike PEFT's for this model, or
            a vector whose shape does not fit its module (the message names the key and both shapes).
        UnsupportedError: ``sample_at_inference``, a config field peftc does not know, or a target
            that is not a linear layer.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "PVERA", FIELDS)
    common.check_number(source, "r", "projection_prng_key")
    if cfg.get("bias", "none") not in ("none", "all", "pvera_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'pvera_only'")
    r = common.positive_int(source, "r", 256)

    saved = {key: source.tensors[key] for key in PROJECTIONS if key in source.tensors}
    rest = dataclasses.replace(source, tensors={k: v for k, v in source.tensors.items() if k not in saved})
    roles = common.suffix_roles({"pvera_lambda_b": "lambda_b", "pvera_lambda_d": "lambda_d"})
    grouped = common.group_keys(rest, modules, roles)
    common.check_modules(source, grouped, modules, common.targeted_modules(cfg, modules))
    dims: dict[str, tuple[int, int, str]] = {}
    for path in sorted(grouped.modules):
        layout = common.layout(source, modules[path], "PVeRA", TYPES)
        dims[path] = (*common.io_dims(modules, modules[path], layout), layout)
    d_in_max = max(d_in for d_in, _, _ in dims.values())
    d_out_max = max(d_out for _, d_out, _ in dims.values())
    shapes = {"pvera_A": (2 * r, d_in_max), "pvera_B": (d_out_max, r)}

    warnings: list[str] = []
    unused = list(grouped.unused)
    if cfg.get("save_projection", True):
        projections = _saved(source, saved, shapes, f"r={r}; largest target d_in={d_in_max}, d_out={d_out_max}")
    else:
        unused += [(key, "save_projection=false: PEFT ignores saved projections and redraws them") for key in saved]
        projections = _redrawn(int(cfg.get("projection_prng_key", 0)), shapes)
        warnings.append(
            f"save_projection=false: pvera_A/pvera_B redrawn from projection_prng_key="
            f"{cfg.get('projection_prng_key', 0)} with torch {torch.__version__}'s CPU generator, as PEFT does when "
            "it loads the adapter; this matches the training run only if its torch drew the same numbers "
            "(save_projection=true avoids the doubt)"
        )

    sites = []
    for path, tensors in sorted(grouped.modules.items()):
        _, d_out, layout = dims[path]
        common.require_roles(source, path, tensors, ["lambda_b", "lambda_d"])
        common.expect_shape(source, tensors["lambda_b"], (d_out,), f"[d_out={d_out}] for {path!r}")
        common.expect_shape(source, tensors["lambda_d"], (2 * r,), f"[2r={2 * r}] (mean and log-variance) for {path!r}")
        site_tensors = {**projections, "pvera_lambda_b": tensors["lambda_b"], "pvera_lambda_d": tensors["lambda_d"]}
        info = {"module_type": modules[path].class_name, "r": r}
        sites.append(Site(path, PVERA_WEIGHT.name, site_tensors, {"layout": layout}, info, "weight"))
    return common.adapter(source, "pvera", sites, grouped, honoured, ignored, warnings, unused=unused)


def _saved(
    source: AdapterSource, saved: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], why: str
) -> dict[str, AdapterTensor]:
    """The projections from the file; PEFT loads them into buffers sized for this model, so shapes must agree."""
    out = {}
    for key, role in PROJECTIONS.items():
        if key not in saved:
            raise InputError(f"{source.weights_path}: save_projection=true but the file has no {key}")
        tensor = AdapterTensor(key, saved[key], shared=True)
        common.expect_shape(source, tensor, shapes[role], f"{list(shapes[role])} ({why})")
        out[role] = tensor
    return out


def _redrawn(seed: int, shapes: dict[str, tuple[int, int]]) -> dict[str, AdapterTensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for role in ("pvera_A", "pvera_B"):  # drawn in this order
        tensor = torch.nn.init.kaiming_uniform_(torch.empty(shapes[role]), generator=generator)
        out[role] = AdapterTensor(f"{role} redrawn from projection_prng_key={seed}", tensor, shared=True)
    return out


METHOD = Method("pvera", ("PVERA",), parse, ops=(PVERA_WEIGHT,), fields=FIELDS)
