"""RandLoRA (PEFT ``RANDLORA``): its weight transform and peftc's parser.

RandLoRA shares two frozen random bases across every adapted module, ``A`` ``[r, 1, m_max]`` and
``B`` ``[M_max, n_max, r]``, and trains per module a ``λ`` ``[r, n]`` and a ``γ`` ``[n, m]``, where
``m = min(d_in, d_out)``, ``M = max(d_in, d_out)`` and ``n = ⌈m / r⌉`` bases make the update full
rank. With the leading slices ``A_s = A[:, :, :m]`` and ``B_s = B[:M, :n, :]``::

    U_A = (λ[:, :, None] · A_s · γ[None]).flatten(0, 1)       [r·n, m]   (row index  i·n + j)
    U_B = B_s.flatten(1)                                       [M, n·r]   (column index j·r + i)
    ΔW  = s · U_B · U_A        when m = d_in  (d_out ≥ d_in)
    ΔW  = s · U_Aᵀ · U_Bᵀ      otherwise                            s = randlora_alpha / r

The two flattenings order the ``(r, n)`` axis differently; that is how PEFT pairs them (its merge and
its forward use the same two matrices, so they agree), and peftc pairs them the same way. GPT-2's
``Conv1D`` stores ``W`` as ``[d_in, d_out]``, so ``ΔW`` is added transposed. The update is formed in
fp32 and added to ``W``, as PEFT does on CPU; the result has ``W``'s dtype.

**Adapter files.** Keys: ``<m>.randlora_lambda`` and ``<m>.randlora_gamma`` per target (``nn.Linear``
or GPT-2 ``Conv1D``, as in PEFT), and with ``save_projection`` the shared bases
``base_model.randlora_A`` / ``base_model.randlora_B``, sized from the element-wise largest
``(d_out, d_in)`` over the targets, plus a copy of both under every target (``<m>.randlora_A``…),
which PEFT loads into the same buffer: they must equal the shared ones and are recorded as unused.
Without saved bases PEFT redraws them from ``projection_prng_key`` when it loads the adapter, and so
does peftc, the same way: a CPU ``torch.Generator`` draws ``A`` then ``n_max`` slices of ``B`` in
bfloat16 (Kaiming-uniform, ``a=√5``), or, with ``sparse`` / ``very_sparse``, uniform ``A`` then ``B``
turned ternary at ``1/(2s)`` (``s = 3`` or ``√m_max``); each basis is then divided by its standard
deviation. Each target becomes one ``randlora_weight`` site on its weight; trained biases and
``modules_to_save`` tensors are full replacements.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

RANDLORA_WEIGHT = SiteOp(
    name="randlora_weight",
    form="weight",
    tensor_roles=("randlora_A", "randlora_B", "randlora_lambda", "randlora_gamma"),
    scalars=("scale", "layout"),
)


def delta_weight(
    basis_a: torch.Tensor,
    basis_b: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    d_out: int,
    d_in: int,
) -> torch.Tensor:
    """RandLoRA's ``ΔW`` ``[d_out, d_in]`` in fp32 (module docstring)."""
    small, large, bases = min(d_in, d_out), max(d_in, d_out), lam.shape[1]
    a = basis_a.to(torch.float32)[:, :bases, :small]
    b = basis_b.to(torch.float32)[:large, :bases, :]
    update_a = (lam.to(torch.float32)[:, :, None] * a * gamma.to(torch.float32)[None]).flatten(0, 1)
    update_b = b.flatten(1)
    delta = update_b @ update_a if small == d_in else update_a.T @ update_b.T
    return delta * scale


@composite_op(
    "randlora_weight(Tensor weight, Tensor randlora_a, Tensor randlora_b, Tensor randlora_lambda, "
    "Tensor randlora_gamma, float scale, str layout) -> Tensor"
)
def randlora_weight(
    weight: torch.Tensor,
    randlora_a: torch.Tensor,
    randlora_b: torch.Tensor,
    randlora_lambda: torch.Tensor,
    randlora_gamma: torch.Tensor,
    scale: float,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    matrix = as_out_in(weight, layout).to(torch.float32)
    d_out, d_in = matrix.shape
    delta = delta_weight(randlora_a, randlora_b, randlora_lambda, randlora_gamma, scale, d_out, d_in)
    return from_out_in(matrix + delta, weight, layout).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "projection_prng_key",
        "save_projection",
        "sparse",
        "very_sparse",
        "randlora_alpha",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "randlora_dropout": "dropout is the identity at inference",
        "init_weights": "initialisation only (the trained λ and γ are in the file)",
    },
    defaults={"r": 32, "randlora_alpha": 640, "projection_prng_key": 0, "save_projection": True, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
SHARED = {"base_model.randlora_A": "randlora_A", "base_model.randlora_B": "randlora_B"}
ROLES = {"randlora_lambda": "lambda", "randlora_gamma": "gamma", "randlora_A": "copy_A", "randlora_B": "copy_B"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a RandLoRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without λ or γ, saved bases
            missing (``save_projection=true``), shaped unlike PEFT's for this model or unlike their
            per-module copies, or a λ/γ whose shape does not fit its module (naming key and shapes).
        UnsupportedError: a config field peftc does not know, or a target that is not a linear layer.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "RANDLORA", FIELDS)
    common.check_number(source, "r", "randlora_alpha", "projection_prng_key")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: RandLoRA config has no target_modules")
    if cfg.get("bias", "none") not in ("none", "all", "randlora_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'randlora_only'")
    r = common.positive_int(source, "r", 32)
    scale = float(cfg.get("randlora_alpha", 640)) / r

    saved = {key: source.tensors[key] for key in SHARED if key in source.tensors}
    rest = dataclasses.replace(source, tensors={k: v for k, v in source.tensors.items() if k not in saved})
    grouped = common.group_keys(rest, modules, common.suffix_roles(ROLES), bias_field="bias")
    common.check_modules(source, grouped, modules, common.targeted_modules(cfg, modules))
    dims: dict[str, tuple[int, int, str]] = {}
    for path in sorted(grouped.modules):
        layout = common.layout(source, modules[path], "RandLoRA", TYPES)
        dims[path] = (*common.io_dims(modules, modules[path], layout), layout)
    d_in_max = max(d_in for d_in, _, _ in dims.values())
    d_out_max = max(d_out for _, d_out, _ in dims.values())
    small, large = min(d_in_max, d_out_max), max(d_in_max, d_out_max)
    shapes = {"randlora_A": (r, 1, small), "randlora_B": (large, math.ceil(small / r), r)}

    warnings: list[str] = []
    unused = list(grouped.unused)
    if cfg.get("save_projection", True):
        bases = _saved(source, saved, shapes, f"r={r}; largest target d_in={d_in_max}, d_out={d_out_max}")
    else:
        unused += [(key, "save_projection=false: PEFT ignores saved bases and redraws them") for key in saved]
        bases = _redrawn(cfg, shapes)
        warnings.append(
            f"save_projection=false: randlora_A/randlora_B redrawn from projection_prng_key="
            f"{cfg.get('projection_prng_key', 0)} with torch {torch.__version__}'s CPU generator, as PEFT does when it "
            "loads the adapter (dense bases in bfloat16, as PEFT draws them wherever accelerate reports bfloat16 "
            "available); this matches the training run only if it drew the same numbers (save_projection=true avoids "
            "the doubt)"
        )

    sites = []
    for path, tensors in sorted(grouped.modules.items()):
        d_in, d_out, layout = dims[path]
        common.require_roles(source, path, tensors, ["lambda", "gamma"])
        bases_n = math.ceil(min(d_in, d_out) / r)
        weight = f"(weight {list(modules.state_shapes[modules[path].params['weight']])})"
        common.expect_shape(source, tensors["lambda"], (r, bases_n), f"[r={r}, bases={bases_n}] for {path!r} {weight}")
        common.expect_shape(
            source, tensors["gamma"], (bases_n, min(d_in, d_out)), f"[bases={bases_n}, min(d_in, d_out)] for {path!r}"
        )
        unused += _copies(source, tensors, bases, cfg.get("save_projection", True))
        site_tensors = {**bases, "randlora_lambda": tensors["lambda"], "randlora_gamma": tensors["gamma"]}
        info = {"module_type": modules[path].class_name, "r": r, "bases": bases_n}
        sites.append(Site(path, RANDLORA_WEIGHT.name, site_tensors, {"scale": scale, "layout": layout}, info, "weight"))
    honoured = {**honoured, "scale": scale}
    return common.adapter(source, "randlora", sites, grouped, honoured, ignored, warnings, unused=unused)


def _saved(
    source: AdapterSource, saved: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], why: str
) -> dict[str, AdapterTensor]:
    """The bases from the file; PEFT loads them into buffers sized for this model, so shapes must agree."""
    out = {}
    for key, role in SHARED.items():
        if key not in saved:
            raise InputError(f"{source.weights_path}: save_projection=true but the file has no {key}")
        tensor = AdapterTensor(key, saved[key], shared=True)
        common.expect_shape(source, tensor, shapes[role], f"{list(shapes[role])} ({why})")
        out[role] = tensor
    return out


def _copies(
    source: AdapterSource, tensors: dict[str, AdapterTensor], bases: dict[str, AdapterTensor], saved: bool
) -> list[tuple[str, str]]:
    """The per-module copies of the bases: unused, after checking they hold what the shared keys hold
    (PEFT loads every copy into the one shared buffer, so differing copies would make it order-dependent)."""
    unused = []
    for role in ("copy_A", "copy_B"):
        copy = tensors.get(role)
        if copy is None:
            continue
        shared = bases[role.replace("copy_", "randlora_")]
        if saved and not torch.equal(copy.tensor, shared.tensor):
            raise InputError(f"{source.describe(copy.key)}: differs from {shared.key}, the shared basis it copies")
        unused.append((copy.key, "per-module copy of the shared basis (PEFT loads it into the same buffer)"))
    return unused


def _redrawn(cfg: Mapping[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, AdapterTensor]:
    """The bases PEFT draws from ``projection_prng_key`` (``RandLoraModel._init_randlora_A_randlora_B*``)."""
    seed = int(cfg.get("projection_prng_key", 0))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    (r, _, small), (large, bases, _) = shapes["randlora_A"], shapes["randlora_B"]
    if cfg.get("very_sparse") or cfg.get("sparse"):
        sparsity = math.sqrt(small) if cfg.get("very_sparse") else 3
        drawn = [torch.rand((r, 1, small), generator=generator), torch.rand((large, bases, r), generator=generator)]
        ternary = []
        for uniform in drawn:
            t = torch.zeros(uniform.shape)
            t[uniform < 1 / (2 * sparsity)] = -1
            t[uniform > 1 - 1 / (2 * sparsity)] = 1
            ternary.append(t / t.std())
        a, b = ternary
    else:

        def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
            empty = torch.empty(shape, dtype=torch.bfloat16)
            return torch.nn.init.kaiming_uniform_(empty, a=math.sqrt(5), generator=generator)

        a = kaiming((r, 1, small))
        b = torch.cat([kaiming((large, 1, r)) for _ in range(bases)], dim=1)
        a, b = a / a.std(), b / b.std()
    key = f"redrawn from projection_prng_key={seed}"
    return {
        "randlora_A": AdapterTensor(f"randlora_A {key}", a.to(torch.float32), shared=True),
        "randlora_B": AdapterTensor(f"randlora_B {key}", b.to(torch.float32), shared=True),
    }


METHOD = Method("randlora", ("RANDLORA",), parse, ops=(RANDLORA_WEIGHT,), fields=FIELDS)
