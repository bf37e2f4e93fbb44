"""HiRA, Hadamard high-rank adaptation (PEFT ``HIRA``): its weight transform and peftc's parser.

HiRA scales every entry of the base weight by a trained low-rank matrix: with ``Δ = B·A`` shaped
like the weight,

    W' = W + W ⊙ Δ = W ⊙ (1 + Δ)                       (no α/r scale)

per layout (``B`` ``[d_out, r]``, ``A`` ``[r, d_in]`` unless noted)::

    nn.Linear       W [d_out, d_in]     Δ = B·A
    GPT-2 Conv1D    W [d_in, d_out]     Δ = (B·A)ᵀ
    nn.Embedding    W [num, dim]        Δ = (B·A)ᵀ       (A [r, num], B [dim, r])
    nn.Conv1d/2d/3d W [o, i, *k]        Δ[o, i, *k] = Σ_p B[o, p] · A[p, i, *k]   (A [r, i, *k], B [o, r, 1…])

PEFT's ``forward`` adds ``layer(x; W ⊙ Δ)`` (the module's function with the modulated weight and no
bias) to the base output and its ``merge`` adds ``W ⊙ Δ`` to ``W``: the same function, except where
the base layer's call does more than read its weight. Refused there: convolutions padded other than
with zeros (PEFT's added convolution pads with zeros), embeddings with ``max_norm`` (the base call
renormalises rows in place, the added lookup does not), and grouped convolutions (PEFT refuses them).
The product is formed in fp32 and cast back to ``W``'s dtype.

**Adapter files.** Keys ``<m>.hira_A``, ``<m>.hira_B`` (``hira_embedding_A``/``_B`` on embeddings) per
target, rank ``r`` or its ``rank_pattern`` entry; ``modules_to_save`` tensors are full replacements.
Each target becomes one ``hira_weight`` site on its weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleInfo, ModuleTable, conv_attributes
from peftc.methods import common, peft_config
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.lycoris import refuse_padding_mode
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

HIRA_WEIGHT = SiteOp(name="hira_weight", form="weight", tensor_roles=("hira_A", "hira_B"), scalars=("layout",))


def modulation(hira_a: torch.Tensor, hira_b: torch.Tensor, layout: str) -> torch.Tensor:
    """``Δ`` in fp32, shaped like the weight of ``layout`` (module docstring)."""
    a, b = hira_a.to(torch.float32), hira_b.to(torch.float32)
    if layout == "conv":
        return torch.einsum("op,pi...->oi...", b.flatten(1), a)
    product = b @ a
    return product.T if layout in ("linear_t", "embedding") else product


@composite_op("hira_weight(Tensor weight, Tensor hira_a, Tensor hira_b, str layout) -> Tensor")
def hira_weight(weight: torch.Tensor, hira_a: torch.Tensor, hira_b: torch.Tensor, layout: str) -> torch.Tensor:
    """``W + W ⊙ Δ`` (fp32 math, cast back to ``W``'s dtype)."""
    w = weight.to(torch.float32)
    return (w + w * modulation(hira_a, hira_b, layout)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "rank_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    ),
    ignored={
        "hira_dropout": "dropout is the identity at inference",
        "init_weights": "initialisation only (the trained factors are in the file)",
        "fan_in_fan_out": "PEFT sets it from the layer type (True for GPT-2 Conv1D, False otherwise), as peftc does",
    },
    defaults={"r": 32},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d")
ROLES = {"hira_A": "hira_A", "hira_B": "hira_B", "hira_embedding_A": "hira_A", "hira_embedding_B": "hira_B"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a HiRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without both factors, a factor
            under the other layer kind's name, or a shape that does not fit the module and rank.
        UnsupportedError: a config field peftc does not know, a layer type PEFT's HiRA does not adapt,
            or a layer whose PEFT forward and merge disagree (module docstring).
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "HIRA", FIELDS)
    common.check_number(source, "r")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: HiRA config has no target_modules")
    grouped = common.group_keys(source, modules, _role_of, bias_field=None)
    layouts = common.layouts(source, grouped, modules, "HiRA", TYPES)
    sites = [
        _site(source, modules, modules[path], layouts[path], tensors)
        for path, tensors in sorted(grouped.modules.items())
    ]
    return common.adapter(source, "hira", sites, grouped, honoured, ignored)


def _role_of(path: str) -> tuple[str, str] | None:
    module, _, local = path.rpartition(".")
    return (module, local) if local in ROLES else None


def _site(
    source: AdapterSource, modules: ModuleTable, module: ModuleInfo, layout: str, tensors: Mapping[str, AdapterTensor]
) -> Site:
    path = module.path
    wanted = ("hira_embedding_A", "hira_embedding_B") if layout == "embedding" else ("hira_A", "hira_B")
    wrong = next((t for role, t in tensors.items() if role not in wanted), None)
    if wrong is not None:
        raise InputError(
            f"{source.describe(wrong.key)}: {module.class_name} {path!r} keeps its HiRA factors in "
            f"{' and '.join(wanted)}, so PEFT would not load this key"
        )
    common.require_roles(source, path, tensors, wanted)
    cfg = source.config
    r = common.check_rank(source, path, peft_config.pattern_value(cfg.get("rank_pattern"), path, cfg.get("r", 32)))
    shape = modules.state_shapes[module.params["weight"]]
    _refuse_inexact(source, module, layout)
    expected = _expected(shape, layout, r)
    for role, want in zip(wanted, expected):
        common.expect_shape(source, tensors[role], want, f"{list(want)} (r={r}) for {path!r} (weight {list(shape)})")
    site_tensors = {"hira_A": tensors[wanted[0]], "hira_B": tensors[wanted[1]]}
    info = {"module_type": module.class_name, "r": r}
    return Site(path, HIRA_WEIGHT.name, site_tensors, {"layout": layout}, info, "weight")


def _expected(shape: tuple[int, ...], layout: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes PEFT gives ``A`` and ``B`` for a weight of ``shape``."""
    if layout == "linear":
        return (r, shape[1]), (shape[0], r)
    if layout in ("linear_t", "embedding"):
        return (r, shape[0]), (shape[1], r)
    return (r, shape[1], *shape[2:]), (shape[0], r, *(1,) * (len(shape) - 2))


def _refuse_inexact(source: AdapterSource, module: ModuleInfo, layout: str) -> None:
    where = f"{source.config_path.name}: HiRA on {module.class_name} {module.path!r}"
    if layout == "conv":
        refuse_padding_mode(source, module, "HiRA")
        groups = (conv_attributes(module) or {}).get("groups", 1)
        if groups != 1:
            raise UnsupportedError(f"{where} (groups={groups}): PEFT's HiRA refuses grouped convolutions")
    if layout == "embedding" and any("renorm" in str(n.target) for call in module.calls for n in call.nodes):
        raise UnsupportedError(
            f"{where} with max_norm: PEFT's base lookup renormalises rows in place before the HiRA term reads them, "
            "so its merged and unmerged models differ"
        )


METHOD = Method("hira", ("HIRA",), parse, ops=(HIRA_WEIGHT,), fields=FIELDS)
