"""Super-Tuning (PEFT ``SUPERTUNING``): its weight transform and peftc's parser.

Super-Tuning trains a sparse set of a linear layer's weight entries: ``k`` trained values ``v`` are
added at ``k`` flat positions ``p`` of ``W`` (``[d_out, d_in]`` flattened row-major). With ``r`` set
("Supra") a LoRA term is added too::

    W' = W + scatter_add(0, p, v) + (α / r) · B A           A [r, d_in], B [d_out, r]

(a position listed twice gets both values, as ``scatter_add`` does). PEFT's merge writes exactly
this; its unmerged forward runs ``F.linear`` on ``W`` with the values scattered in and adds the LoRA
output, the same function (checked against PEFT's layers in the tests). Formed in fp32; the result
has ``W``'s dtype.

The support has ``k = ⌊d_out·d_in·(1 − sparsity)⌋`` positions, chosen when the adapter was created:
the ``k`` largest (``select_top``, else smallest) ``|W|``. With ``save_precomputed_indices`` the file
holds them; without, PEFT chooses them again from the base weight when it loads the adapter, and so
does peftc, the same way (``torch.topk`` over ``|W|`` flattened, in ``W``'s dtype), with a warning:
the choice matches training only if the base weight and torch's tie-breaking are the same.

**Adapter files.** Keys per target (``nn.Linear`` only, as in PEFT): ``<m>.supertuning_values``
``[k]``, ``<m>.supertuning_indices`` ``[k]`` (integer; read as int64, recorded as
``<key> as int64``) when ``save_precomputed_indices``, and ``<m>.supertuning_lora_A.weight``,
``<m>.supertuning_lora_B.weight`` when ``r`` is set. ``modules_to_save`` tensors are full
replacements. Each target becomes one ``supertuning_weight`` site on its weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

SUPERTUNING_WEIGHT = SiteOp(
    name="supertuning_weight",
    form="weight",
    tensor_roles=("supertuning_indices", "supertuning_values", "supertuning_lora_A", "supertuning_lora_B"),
    scalars=("scale",),
)


def add_at(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``flat`` with ``values`` added at ``indices`` (repeated positions add up), in fp32."""
    return flat.scatter_add(0, indices.to(torch.int64), values.to(torch.float32))


@composite_op(
    "supertuning_weight(Tensor weight, Tensor indices, Tensor values, Tensor? lora_a, Tensor? lora_b, "
    "float scale) -> Tensor"
)
def supertuning_weight(
    weight: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``W + scatter_add(p, v) + s·B A`` (fp32, cast back to ``W``'s dtype)."""
    adapted = add_at(weight.to(torch.float32).reshape(-1), indices, values).reshape(weight.shape)
    if lora_a is not None and lora_b is not None:
        adapted = adapted + scale * (lora_b.to(torch.float32) @ lora_a.to(torch.float32))
    return adapted.to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "sparsity",
        "select_top",
        "save_precomputed_indices",
        "r",
        "lora_alpha",
        "target_modules",
        "modules_to_save",
    ),
    ignored={
        "lora_dropout": "dropout is the identity at inference",
        "init_weights": "initialisation only (the trained values are in the file)",
    },
    defaults={"sparsity": 0.99, "select_top": True, "save_precomputed_indices": True, "r": None, "lora_alpha": None},
)
ROLES = {"supertuning_values": "supertuning_values", "supertuning_indices": "supertuning_indices"}
ROLES |= {"supertuning_lora_A.weight": "supertuning_lora_A", "supertuning_lora_B.weight": "supertuning_lora_B"}


def _settings(source: AdapterSource) -> dict[str, Any]:
    cfg = source.config
    common.check_number(source, "sparsity", "r", "lora_alpha")
    value = {k: d if cfg.get(k) is None else cfg[k] for k, d in FIELDS.defaults.items()}
    if not 0.0 <= value["sparsity"] < 1.0:
        raise InputError(f"{source.config_path}: sparsity={value['sparsity']!r}; it must be in [0, 1)")
    if value["r"] is not None:
        value["r"] = common.check_rank(source, "every target", value["r"])
        value["lora_alpha"] = 2 * value["r"] if value["lora_alpha"] is None else value["lora_alpha"]
    return value


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a Super-Tuning adapter against the base model's modules.

    Raises:
        InputError: a sparsity outside [0, 1) or one that leaves a target no entry; a key for no
            targeted module, a targeted module without its values (or indices, or LoRA factors where
            ``r`` is set), LoRA factors where ``r`` is unset, indices that are not integers or point
            outside the weight, or a shape that does not fit the module (naming the key and shapes).
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear``.
    """
    value = _settings(source)
    r, saved = value["r"], bool(value["save_precomputed_indices"])
    unused: list[tuple[str, str]] = []
    warned: list[str] = []

    def build(module: per_module.Module, warnings: list[str]) -> list[Site]:
        numel = module.d_in * module.d_out
        k = int(numel * (1 - value["sparsity"]))
        if k < 1:
            raise InputError(
                f"{source.config_path}: sparsity={value['sparsity']} leaves no entry of {module.describe()} "
                "(PEFT refuses it too)"
            )
        shapes = {"supertuning_values": (k,)}
        if r is not None:
            shapes |= {"supertuning_lora_A": (r, module.d_in), "supertuning_lora_B": (module.d_out, r)}
        tensors = dict(module.tensors)
        if saved:
            shapes["supertuning_indices"] = (k,)
        elif "supertuning_indices" in tensors:
            why = "save_precomputed_indices=false: PEFT ignores saved indices and chooses them again"
            unused.append((tensors.pop("supertuning_indices").key, why))
        extra = next((t for role, t in tensors.items() if role not in shapes), None)
        if extra is not None:
            raise InputError(f"{source.describe(extra.key)}: r is unset, so PEFT creates no LoRA factors")
        per_module.require(source, dataclasses.replace(module, tensors=tensors), shapes, f"k={k}")
        indices = _indices(source, tensors["supertuning_indices"], numel) if saved else None
        if indices is None:
            indices = _chosen(source, modules, module, k, bool(value["select_top"]))
            if not warned:
                warned.append(
                    f"save_precomputed_indices=false: sparse positions chosen again from the base weights with torch "
                    f"{torch.__version__}'s topk, as PEFT does when it loads the adapter; they match training only if "
                    "the base weights and tie-breaking are the same (save_precomputed_indices=true avoids the doubt)"
                )
                warnings.extend(warned)
        site_tensors = {role: tensors.get(role) for role in SUPERTUNING_WEIGHT.tensor_roles}
        site_tensors["supertuning_indices"] = indices
        scale = value["lora_alpha"] / r if r is not None else 0.0
        info = {"module_type": module.info.class_name, "entries": k, "r": r}
        if not saved:
            info["base_weight_derived"] = "Super-Tuning's positions are chosen from the base weight when it is loaded"
        return [Site(module.path, SUPERTUNING_WEIGHT.name, site_tensors, {"scale": scale}, info, "weight")]

    adapter = per_module.parse(
        source,
        modules,
        peft_type="SUPERTUNING",
        title="Super-Tuning",
        fields=FIELDS,
        roles=ROLES,
        types=per_module.LINEAR_TYPES,
        build=build,
        bias_field=None,
    )
    return dataclasses.replace(adapter, unused=(*adapter.unused, *unused))


def _indices(source: AdapterSource, saved: AdapterTensor, numel: int) -> AdapterTensor:
    """The file's positions as int64, checked to be integers inside the weight."""
    tensor = saved.tensor
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise InputError(f"{source.describe(saved.key)}: dtype {tensor.dtype}; sparse positions are integers")
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= numel):
        raise InputError(f"{source.describe(saved.key)}: positions outside the weight's {numel} entries")
    return AdapterTensor(f"{saved.key} as int64", tensor.to(torch.int64))


def _chosen(source: AdapterSource, modules: ModuleTable, module: per_module.Module, k: int, top: bool) -> AdapterTensor:
    """The ``k`` positions PEFT chooses from the base weight (largest or smallest ``|W|``)."""
    weight = modules.tensors.get(module.info.params["weight"])
    if weight is None:
        raise InputError(
            f"{source.config_path}: save_precomputed_indices=false, so the sparse positions of {module.path!r} are "
            "chosen from the base weight, which this program does not hold"
        )
    _, indices = torch.topk(weight.detach().abs().flatten(), k=k, largest=top)
    key = f"positions of {module.path} chosen from the base weight (select_top={top})"
    return AdapterTensor(key, indices.to(torch.int64))


METHOD = Method("supertuning", ("SUPERTUNING",), parse, ops=(SUPERTUNING_WEIGHT,), fields=FIELDS)
