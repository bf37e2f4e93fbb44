"""PSOFT, orthogonal fine-tuning in the principal subspace (PEFT ``PSOFT``): weight transform and parser.

PSOFT puts a trained ``r×r`` matrix ``R`` between two frozen factors of the base weight's top-``r``
singular subspace, ``A`` ``[r, d_in]`` and ``B`` ``[d_out, r]``::

    W' = W + s · B (R − I) A                         s = psoft_alpha / r

``R`` is, with ``psoft_orth`` (default), the Cayley transform of a skew-symmetric ``Q = U(q) − U(q)ᵀ``
built from the ``r(r−1)/2`` trained upper-triangular entries ``q`` (row-major)::

    exact (use_cayley_neumann=False):  R = (I + Q)(I − Q)⁻¹
    Cayley–Neumann (n terms):          R = I + 2Q + … + 2Q^{m−1} + Q^m,   m = max(3, n − 1)
                                       (n = 2: I + 2Q;  n ≤ 1: I), after scaling Q down to Frobenius
                                       norm ``cayley_neumann_eps`` if larger (when that is set)

and otherwise the trained ``[r, r]`` matrix itself; then ``R ← diag(b)·R·diag(a)`` with the trained
vectors ``b`` (``psoft_mag_b``) and ``a`` (``psoft_mag_a``). The series and the unpivoted solve are
OFT's (``peftc/methods/oft.py``); ``I − Q`` has symmetric part ``I``, so the solve needs no pivoting.
PEFT's ``forward`` (``x Aᵀ``, rotated, minus itself, times ``Bᵀ``, scaled) is the same function as
its ``merge`` (measured 1e-7 relative apart on a small model).

**Regenerated tensors.** ``A`` and ``B`` are not in the file: PEFT rebuilds them from the base weight
``W`` (fp32) whenever it loads the adapter, and so does peftc, the same way. With ``U, S, Vᴴ`` the top
``r`` singular triplets (``psoft_svd="full"``: ``torch.linalg.svd``; ``"lowrank"``:
``torch.svd_lowrank(W, q=r, niter=psoft_svd_lowrank_niter)`` under ``torch.manual_seed(random_seed)``
in a forked CPU generator) and ``S' = S / s``::

    psoft_init:  A = Vᴴ,              B = U·diag(S')
    pissa_init:  A = diag(√S')·Vᴴ,    B = U·diag(√S')

``B (R − I) A`` changes when a singular vector pair flips sign, so the result matches the training run
only where its SVD returned the same signs (a warning says so), as it does for PEFT itself.

**Adapter files.** Keys ``<m>.psoft_R.weight`` (``[r(r−1)/2]``, or ``[r, r]`` without
``psoft_orth``), ``.psoft_R.vector_a`` and ``.psoft_R.vector_b`` ``[r]`` per ``nn.Linear`` target (the
only type PEFT's PSOFT adapts); ``modules_to_save`` tensors are full replacements. Each target
becomes one ``psoft_weight`` site on its weight, formed in fp32 and cast back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.oft import cayley_neumann_series, skew_from_upper, solve_unpivoted
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

PSOFT_WEIGHT = SiteOp(
    name="psoft_weight",
    form="weight",
    tensor_roles=("psoft_A", "psoft_B", "psoft_R", "psoft_vector_a", "psoft_vector_b"),
    scalars=("orth", "cayley_neumann", "neumann_terms", "neumann_eps", "scale"),
)


def rotation(
    size: int,
    r_param: torch.Tensor,
    vector_a: torch.Tensor | None,
    vector_b: torch.Tensor | None,
    orth: bool,
    cayley_neumann: bool,
    neumann_terms: int,
    neumann_eps: float,
) -> torch.Tensor:
    """PSOFT's ``R`` ``[size, size]`` in fp32 (module docstring); ``neumann_eps`` ≤ 0 means no projection."""
    r = r_param.to(torch.float32)
    if orth:
        q = skew_from_upper(r[None, :], size)
        if cayley_neumann:
            if neumann_eps > 0:
                norm = torch.linalg.vector_norm(q)
                q = torch.where(norm > neumann_eps, q * (neumann_eps / (norm + 1e-12)), q)
            r = cayley_neumann_series(q, neumann_terms)[0]
        else:
            eye = torch.eye(size, dtype=q.dtype).expand_as(q)
            r = solve_unpivoted(eye - q, eye + q)[0]  # (I − Q)⁻¹(I + Q), equal to (I + Q)(I − Q)⁻¹
    if vector_b is not None:
        r = vector_b.to(torch.float32)[:, None] * r
    if vector_a is not None:
        r = r * vector_a.to(torch.float32)[None, :]
    return r


@composite_op(
    "psoft_weight(Tensor weight, Tensor psoft_a, Tensor psoft_b, Tensor psoft_r, Tensor? vector_a, Tensor? vector_b, "
    "bool orth, bool cayley_neumann, int neumann_terms, float neumann_eps, float scale) -> Tensor"
)
def psoft_weight(
    weight: torch.Tensor,
    psoft_a: torch.Tensor,
    psoft_b: torch.Tensor,
    psoft_r: torch.Tensor,
    vector_a: torch.Tensor | None,
    vector_b: torch.Tensor | None,
    orth: bool,
    cayley_neumann: bool,
    neumann_terms: int,
    neumann_eps: float,
    scale: float,
) -> torch.Tensor:
    """``W + s·B(R − I)A`` for an ``nn.Linear`` weight (fp32 math, cast back)."""
    r = rotation(psoft_a.shape[0], psoft_r, vector_a, vector_b, orth, cayley_neumann, neumann_terms, neumann_eps)
    eye = torch.eye(r.shape[0], dtype=torch.float32)
    delta = psoft_b.to(torch.float32) @ (r - eye) @ psoft_a.to(torch.float32) * scale
    return (weight.to(torch.float32) + delta).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "psoft_alpha",
        "ab_svd_init",
        "psoft_svd",
        "psoft_svd_lowrank_niter",
        "random_seed",
        "psoft_orth",
        "psoft_mag_a",
        "psoft_mag_b",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "cayley_neumann_eps",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    ),
    ignored={
        "psoft_dropout": "dropout is the identity at inference",
        "init_weights": "initialisation only (the trained parameters are in the file)",
        "fan_in_fan_out": "PEFT's PSOFT adapts nn.Linear only, whose layout is fixed (it resets the flag to False)",
    },
    defaults={
        "r": 32,
        "psoft_alpha": 32,
        "ab_svd_init": "psoft_init",
        "psoft_svd": "full",
        "psoft_svd_lowrank_niter": 10,
        "random_seed": 0,
        "psoft_orth": True,
        "psoft_mag_a": True,
        "psoft_mag_b": True,
        "use_cayley_neumann": False,
        "num_cayley_neumann_terms": 5,
        "cayley_neumann_eps": None,
    },
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear")
ROLES = {"psoft_R.weight": "psoft_R", "psoft_R.vector_a": "psoft_vector_a", "psoft_R.vector_b": "psoft_vector_b"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a PSOFT adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its tensors (or with
            vectors its config does not train), a shape that does not fit ``r`` (naming key and shapes),
            ``r`` larger than a module's smaller side, or an unknown ``ab_svd_init``/``psoft_svd``.
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear``.
    """
    honoured, ignored = common.classify_fields(source, "PSOFT", FIELDS)
    common.check_number(source, "r", "psoft_alpha", "num_cayley_neumann_terms", "cayley_neumann_eps")
    settings = {k: FIELDS.defaults[k] if honoured[k] is None else honoured[k] for k in FIELDS.defaults}
    where = source.config_path
    if source.config.get("target_modules") is None:
        raise InputError(f"{where}: PSOFT config has no target_modules")
    for field, allowed in (("ab_svd_init", ("psoft_init", "pissa_init")), ("psoft_svd", ("full", "lowrank"))):
        if settings[field] not in allowed:
            raise InputError(f"{where}: {field}={settings[field]!r}; expected one of {', '.join(allowed)}")
    r = settings["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"{where}: r={r!r}; give a rank >= 1")
    grouped = common.group_keys(source, modules, common.suffix_roles(ROLES), bias_field=None)
    common.layouts(source, grouped, modules, "PSOFT", TYPES)
    sites = [_site(source, modules, path, tensors, r, settings) for path, tensors in sorted(grouped.modules.items())]
    warning = (
        f"PSOFT's frozen factors A and B were recomputed from the base weights' SVD ({settings['psoft_svd']}) with "
        f"torch {torch.__version__} on CPU, as PEFT does when it loads the adapter; the adapter computes what it "
        "was trained to only if the training run's SVD returned singular vectors of the same signs"
    )
    return common.adapter(source, "psoft", sites, grouped, honoured, ignored, [warning])


def _site(
    source: AdapterSource,
    modules: ModuleTable,
    path: str,
    tensors: Mapping[str, AdapterTensor],
    r: int,
    settings: Mapping[str, Any],
) -> Site:
    fqn = modules[path].params["weight"]
    d_out, d_in = modules.state_shapes[fqn]
    if r > min(d_out, d_in):
        raise InputError(
            f"{source.config_path}: r={r} exceeds min(d_out, d_in) of {path!r} (weight [{d_out}, {d_in}]); "
            "PEFT refuses it"
        )
    orth = bool(settings["psoft_orth"])
    expected = {"psoft_R": (r * (r - 1) // 2,) if orth else (r, r)}
    for flag, role in (("psoft_mag_a", "psoft_vector_a"), ("psoft_mag_b", "psoft_vector_b")):
        if settings[flag]:
            expected[role] = (r,)
        elif role in tensors:
            raise InputError(f"{source.describe(tensors[role].key)}: {flag}=false, so PEFT would not load this key")
    common.require_roles(source, path, tensors, expected)
    for role, shape in expected.items():
        what = f"{list(shape)} (r={r}, psoft_orth={orth}) for {path!r}"
        common.expect_shape(source, tensors[role], shape, what)
    site_tensors: dict[str, AdapterTensor | None] = {role: tensors.get(role) for role in ROLES.values()}
    site_tensors.update(_frozen_factors(modules.tensors[fqn], path, r, settings))
    neumann = bool(settings["use_cayley_neumann"])
    eps = settings["cayley_neumann_eps"]
    scalars = {
        "orth": orth,
        "cayley_neumann": neumann,
        "neumann_terms": int(settings["num_cayley_neumann_terms"]),
        "neumann_eps": float(eps) if neumann and eps is not None else 0.0,
        "scale": float(settings["psoft_alpha"]) / r,
    }
    info = {"module_type": modules[path].class_name, "r": r, "ab_svd_init": settings["ab_svd_init"],
            "base_weight_derived": "PSOFT's frozen factors are rebuilt from the base weight when it is loaded"}  # fmt: skip
    return Site(path, PSOFT_WEIGHT.name, site_tensors, scalars, info, "weight")


def _frozen_factors(weight: torch.Tensor, path: str, r: int, settings: Mapping[str, Any]) -> dict[str, AdapterTensor]:
    """``A`` and ``B`` rebuilt from the base weight as PEFT's layer builds them (module docstring)."""
    w = weight.detach().to(torch.float32)
    if settings["psoft_svd"] == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(settings["random_seed"]))
            u, s, v = torch.svd_lowrank(w, q=r, niter=int(settings["psoft_svd_lowrank_niter"]))
        vh = v.T
    u, s, vh = u[:, :r], s[:r], vh[:r, :]
    scaled = s / (float(settings["psoft_alpha"]) / r)
    if settings["ab_svd_init"] == "psoft_init":
        a, b = vh, u @ torch.diag(scaled)
    else:
        root = torch.sqrt(scaled)
        a, b = torch.diag(root) @ vh, u @ torch.diag(root)
    what = f"from the SVD of {path}.weight ({settings['ab_svd_init']}, {settings['psoft_svd']})"
    return {
        "psoft_A": AdapterTensor(f"psoft_A {what}", a.contiguous()),  # PEFT keeps them in fp32
        "psoft_B": AdapterTensor(f"psoft_B {what}", b.contiguous()),
    }


METHOD = Method("psoft", ("PSOFT",), parse, ops=(PSOFT_WEIGHT,), fields=FIELDS)
