"""GLoRA, generalised LoRA (PEFT ``GLORA``): its weight and bias transforms and peftc's parser.

GLoRA rewrites a linear layer's weight and bias with five trained terms::

    W' = W + W ⊙ A + B
    b' = b + b ⊙ D + E + W·C          (W·C: [d_out, d_in]·[d_in, 1], squeezed; W is the weight before W')

Each term is a *path* whose form the config chooses (``config_A_B`` for A and B, ``config_C``,
``config_D_E``): ``lora`` ``X_d·X_u`` (A, B: ``[d_out, r]·[r, d_in]``; C: ``[d_in, r]·[r, 1]``),
``vector`` (A, B: ``[d_out, 1]``, broadcast along the inputs; C ``[d_in, 1]``; D, E ``[d_out]``),
``constant`` (one scalar ``[1]``, A/B/D/E) or ``none``: a ``zeros`` buffer of the term's full shape,
which PEFT saves and loads like any other tensor, so peftc reads it as a dense term. A module
without a bias has no C, D, E (PEFT gives it ``zeros`` buffers it never reads; their keys are
recorded as unused).

PEFT's merge writes exactly ``W'`` and ``b'``; its unmerged forward computes ``x W'ᵀ + b'`` and adds
and subtracts the base output, the same function up to rounding (checked against PEFT's layers in
the tests). Both are formed in fp32 and cast back to the parameter's dtype.

**Adapter files.** Keys per target (plain ``nn.Linear`` only, as in PEFT):
``<m>.glora_<T>.Xd`` / ``.Xu`` (``lora``), ``<m>.glora_<T>.X`` (``vector``, ``constant``) or
``<m>.glora_<T>.zeros`` (``none``) for ``T`` in A…E. Trained biases (``bias``) and
``modules_to_save`` tensors are full replacements. Each target becomes a ``glora_bias`` site on
its bias, which reads the weight as the adapter finds it (``SiteOp.base_params``), then a
``glora_weight`` site on its weight.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

GLORA_WEIGHT = SiteOp(
    name="glora_weight", form="weight", tensor_roles=("glora_A", "glora_A_u", "glora_B", "glora_B_u"), scalars=()
)
GLORA_BIAS = SiteOp(
    name="glora_bias",
    form="weight",
    tensor_roles=("glora_C", "glora_C_u", "glora_D", "glora_E"),
    scalars=(),
    base_params=("weight",),
)


def path(first: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
    """One term in fp32: ``X_d·X_u`` for a ``lora`` path, else the stored tensor itself."""
    first = first.to(torch.float32)
    return first if second is None else first @ second.to(torch.float32)


@composite_op("glora_weight(Tensor weight, Tensor a, Tensor? a_u, Tensor b, Tensor? b_u) -> Tensor")
def glora_weight(
    weight: torch.Tensor, a: torch.Tensor, a_u: torch.Tensor | None, b: torch.Tensor, b_u: torch.Tensor | None
) -> torch.Tensor:
    """``W + W ⊙ A + B`` (fp32, cast back to ``W``'s dtype)."""
    w = weight.to(torch.float32)
    return (w + w * path(a, a_u) + path(b, b_u)).to(weight.dtype)


@composite_op("glora_bias(Tensor bias, Tensor weight, Tensor c, Tensor? c_u, Tensor d, Tensor e) -> Tensor")
def glora_bias(
    bias: torch.Tensor,
    weight: torch.Tensor,
    c: torch.Tensor,
    c_u: torch.Tensor | None,
    d: torch.Tensor,
    e: torch.Tensor,
) -> torch.Tensor:
    """``b + b ⊙ D + E + W·C`` (fp32, cast back to ``b``'s dtype); ``weight`` is the weight before GLoRA's."""
    b = bias.to(torch.float32)
    coupled = (weight.to(torch.float32) @ path(c, c_u)).squeeze(-1)
    return (b + b * d.to(torch.float32) + e.to(torch.float32) + coupled).to(bias.dtype)


FIELDS = common.Fields(
    honoured=("r", "config_A_B", "config_C", "config_D_E", "target_modules", "bias", "modules_to_save"),
    ignored={"init_weights": "initialisation only (the trained terms are in the file)"},
    defaults={"r": 8, "config_A_B": "lora", "config_C": "lora", "config_D_E": "constant", "bias": "none"},
)
FORMS = {"config_A_B": ("lora", "vector", "constant", "none"), "config_C": ("lora", "vector", "none")}
FORMS |= {"config_D_E": ("vector", "constant", "none")}
SUFFIXES = {"Xd": "", "Xu": "_u", "X": "", "zeros": ""}
"""The stored tensor of each path form → the role suffix it fills (``Xu`` is the second factor)."""
OP_ROLES = {f"glora_{t}.{key}": f"glora_{t}{suffix}" for t in "ABCDE" for key, suffix in SUFFIXES.items()}
"""Each stored tensor's role in the site ops (the file's own names are the parser's roles)."""


def shapes(form: str, term: str, d_in: int, d_out: int, r: int) -> dict[str, tuple[int, ...]]:
    """The tensors PEFT creates for ``term`` (A…E) in ``form``: key suffix → shape."""
    full = {"A": (d_out, d_in), "B": (d_out, d_in), "C": (d_in, 1), "D": (d_out,), "E": (d_out,)}[term]
    if form == "lora":
        return {"Xd": (full[0], r), "Xu": (r, full[1])}
    if form == "vector":
        return {"X": (full[0], 1) if term in "ABC" else full}
    if form == "constant":
        return {"X": (1,)}
    return {"zeros": full}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a GLoRA adapter against the base model's modules.

    Raises:
        InputError: an unknown path form, a rank that is not a positive integer, a key for no
            targeted module, a term stored in another form than the config's (or missing), or a
            tensor whose shape does not fit its module (naming the key and both shapes).
        UnsupportedError: a config field peftc does not know, or a target that is not a plain
            ``nn.Linear``.
    """
    cfg = source.config
    settings = {k: FIELDS.defaults[k] if cfg.get(k) is None else cfg[k] for k in FORMS}
    for field, allowed in FORMS.items():
        if settings[field] not in allowed:
            raise InputError(f"{source.config_path}: {field}={settings[field]!r}; expected one of {', '.join(allowed)}")
    r = common.check_rank(source, "every target", cfg.get("r", 8))
    unused: list[tuple[str, str]] = []

    def build(module: per_module.Module, warnings: list[str]) -> list[Site]:
        has_bias = "bias" in module.info.params
        form = dict.fromkeys("AB", settings["config_A_B"]) | {"C": settings["config_C"]}
        form |= dict.fromkeys("DE", settings["config_D_E"])
        if not has_bias:  # PEFT gives a module without a bias empty C, D, E paths, never read
            form |= dict.fromkeys("CDE", "none")
        keyed = {
            f"glora_{t}.{k}": s for t in "ABCDE" for k, s in shapes(form[t], t, module.d_in, module.d_out, r).items()
        }
        found = dict(module.tensors)
        for key, t in found.items():
            if key not in keyed:
                raise InputError(
                    f"{source.describe(t.key)}: PEFT creates no {key} for {module.path!r} with config_A_B="
                    f"{settings['config_A_B']!r}, config_C={settings['config_C']!r}, config_D_E="
                    f"{settings['config_D_E']!r}{'' if has_bias else ' (the module has no bias)'}"
                )
        for key, shape in keyed.items():
            if key not in found:
                raise InputError(f"{source.weights_path}: module {module.path!r} has no {key}")
            common.expect_shape(source, found[key], shape, f"{list(shape)} for {module.describe()}, r={r}")
        tensors = {OP_ROLES[k]: t for k, t in found.items()}
        info = {"module_type": module.info.class_name, **{f: settings[f] for f in FORMS}}
        weight = {role: tensors.get(role) for role in GLORA_WEIGHT.tensor_roles}
        sites = [Site(module.path, GLORA_WEIGHT.name, weight, {}, info, "weight")]
        if not has_bias:
            why = "the module has no bias; PEFT never reads its GLoRA bias terms"
            unused.extend((t.key, why) for k, t in found.items() if k.split(".")[0][-1] in "CDE")
            return sites
        bias = {role: tensors.get(role) for role in GLORA_BIAS.tensor_roles}
        return [Site(module.path, GLORA_BIAS.name, bias, {}, info, "bias"), *sites]  # bias first: it reads W

    adapter = per_module.parse(
        source,
        modules,
        peft_type="GLORA",
        title="GLoRA",
        fields=FIELDS,
        roles={key: key for key in OP_ROLES},
        types=("Linear",),
        build=build,
        bias_modes=("none", "all", "glora_only"),
    )
    return dataclasses.replace(adapter, unused=(*adapter.unused, *unused))


METHOD = Method("glora", ("GLORA",), parse, ops=(GLORA_WEIGHT, GLORA_BIAS), fields=FIELDS)
