"""VB-LoRA (PEFT ``VBLORA``): its weight transform and peftc's parser.

VB-LoRA builds every LoRA factor from one shared *vector bank* ``V`` ``[num_vectors, L]``
(``L = vector_length``). Each length-``L`` piece of a factor is a softmax-weighted mix of the ``k``
bank vectors its logits rank highest (``k = topk``)::

    mix(ℓ)[…] = Σ_j softmax(topk(ℓ[…]))_j · V[argtopk(ℓ[…])_j]                    (ℓ[…] ∈ ℝ^num_vectors)
    A = mix(ℓ_A).reshape(r, d_in)                       ℓ_A [r, d_in/L, num_vectors]
    B = mix(ℓ_B).transpose(1, 2).reshape(d_out, r)      ℓ_B [d_out/L, r, num_vectors]
    ΔW = B · A

PEFT's forward adds ``(x Aᵀ) Bᵀ`` with the same ``A`` and ``B``, so it and the merge agree. There is
no scale. GPT-2's ``Conv1D`` stores ``W`` as ``[d_in, d_out]``, so ``ΔW`` is added transposed. The
update is formed in fp32 and added to ``W``; the result has ``W``'s dtype. ``topk`` lowers to ONNX
``TopK`` and the bank lookup to ``Gather``, so the unmerged form needs no special lowering.

**Adapter files.** Keys: ``<m>.vblora_logits_A`` and ``<m>.vblora_logits_B`` per target (``nn.Linear``
or GPT-2 ``Conv1D``, as in PEFT) and the shared ``base_model.vblora_vector_bank``. With
``save_only_topk_weights`` each logits tensor is saved as ``<key>_topk_indices`` (integers) and
``<key>_topk_weights`` (the first ``k − 1`` softmax weights); PEFT rebuilds the logits from them
when it loads, as ``log`` of the weights (the last one ``1 − Σ`` of the others) at the indices and
``−∞`` elsewhere, and so does peftc. Each target becomes one ``vblora_weight`` site on its weight;
trained biases (``bias``) and ``modules_to_save`` tensors are full replacements.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

VBLORA_WEIGHT = SiteOp(
    name="vblora_weight",
    form="weight",
    tensor_roles=("vblora_vector_bank", "vblora_logits_A", "vblora_logits_B"),
    scalars=("topk", "layout"),
)


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Each row of ``logits`` ``[…, num_vectors]`` as the softmax-weighted sum of its top-k bank vectors."""
    top, indices = logits.topk(topk, dim=-1)
    return (torch.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def delta_weight(bank: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor, topk: int) -> torch.Tensor:
    """``B · A`` ``[d_out, d_in]`` in fp32 (module docstring)."""
    bank = bank.to(torch.float32)
    a = mix(logits_a.to(torch.float32), bank, topk).reshape(logits_a.shape[0], -1)
    b = mix(logits_b.to(torch.float32), bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return b @ a


@composite_op(
    "vblora_weight(Tensor weight, Tensor vblora_vector_bank, Tensor vblora_logits_a, Tensor vblora_logits_b, "
    "int topk, str layout) -> Tensor"
)
def vblora_weight(
    weight: torch.Tensor,
    vblora_vector_bank: torch.Tensor,
    vblora_logits_a: torch.Tensor,
    vblora_logits_b: torch.Tensor,
    topk: int,
    layout: str,
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` ``[d_out, d_in]`` or ``linear_t`` ``[d_in, d_out]`` weight (fp32 math)."""
    delta = delta_weight(vblora_vector_bank, vblora_logits_a, vblora_logits_b, topk)
    return (weight.to(torch.float32) + (delta.T if layout == "linear_t" else delta)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "num_vectors",
        "vector_length",
        "topk",
        "save_only_topk_weights",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "vblora_dropout": "dropout is the identity at inference",
        "init_vector_bank_bound": "initialisation only (the trained bank is in the file)",
        "init_logits_std": "initialisation only (the trained logits are in the file)",
    },
    defaults={"r": 4, "num_vectors": 256, "vector_length": 256, "topk": 2, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
BANK = "base_model.vblora_vector_bank"
ROLES = {
    "vblora_logits_A": "A",
    "vblora_logits_B": "B",
    "vblora_logits_A_topk_indices": "A_indices",
    "vblora_logits_A_topk_weights": "A_weights",
    "vblora_logits_B_topk_indices": "B_indices",
    "vblora_logits_B_topk_weights": "B_weights",
}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a VB-LoRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its logits, a missing or
            misshapen vector bank, a module whose sizes ``vector_length`` does not divide, logits (or
            top-k indices and weights) whose shape does not fit, or indices outside the bank.
        UnsupportedError: a config field peftc does not know, or a target that is not a linear layer.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "VBLORA", FIELDS)
    common.check_number(source, "r", "num_vectors", "vector_length", "topk")
    if cfg.get("bias", "none") not in ("none", "all", "vblora_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'vblora_only'")
    r = common.positive_int(source, "r", 4)
    count, length, topk = (
        common.positive_int(source, k, FIELDS.defaults[k]) for k in ("num_vectors", "vector_length", "topk")
    )
    if topk > count:
        raise InputError(
            f"{source.config_path}: topk={topk} but num_vectors={count}; topk picks among the bank's vectors"
        )
    if BANK not in source.tensors:
        raise InputError(f"{source.weights_path}: no {BANK} (the shared vector bank)")
    bank = AdapterTensor(BANK, source.tensors[BANK], shared=True)
    common.expect_shape(source, bank, (count, length), f"[num_vectors={count}, vector_length={length}]")

    rest = dataclasses.replace(source, tensors={k: v for k, v in source.tensors.items() if k != BANK})
    grouped = common.group_keys(rest, modules, common.suffix_roles(ROLES))
    common.check_modules(source, grouped, modules, common.targeted_modules(cfg, modules))
    topk_only = bool(cfg.get("save_only_topk_weights", False))
    sites = []
    for path, tensors in sorted(grouped.modules.items()):
        module = modules[path]
        layout = common.layout(source, module, "VB-LoRA", TYPES)
        d_in, d_out = common.io_dims(modules, module, layout)
        if d_in % length or d_out % length:
            raise InputError(
                f"{source.config_path}: vector_length={length} does not divide module {path!r} "
                f"(d_in={d_in}, d_out={d_out}), as PEFT requires"
            )
        shapes = {"A": (r, d_in // length, count), "B": (d_out // length, r, count)}
        logits = {side: _logits(source, path, tensors, side, shapes[side], topk_only, topk) for side in "AB"}
        site_tensors = {"vblora_vector_bank": bank, "vblora_logits_A": logits["A"], "vblora_logits_B": logits["B"]}
        info = {"module_type": module.class_name, "r": r}
        sites.append(Site(path, VBLORA_WEIGHT.name, site_tensors, {"topk": topk, "layout": layout}, info, "weight"))
    return common.adapter(source, "vblora", sites, grouped, honoured, ignored)


def _logits(
    source: AdapterSource,
    path: str,
    tensors: dict[str, AdapterTensor],
    side: str,
    shape: tuple[int, ...],
    topk_only: bool,
    topk: int,
) -> AdapterTensor:
    """The logits of one factor: as saved, or rebuilt from top-k indices and weights as PEFT does."""
    where = f"[{', '.join(map(str, shape))}] for {path!r} (r, d/vector_length, num_vectors)"
    if not topk_only:
        common.require_roles(source, path, tensors, [side])
        common.expect_shape(source, tensors[side], shape, where)
        return tensors[side]
    common.require_roles(source, path, tensors, [f"{side}_indices", f"{side}_weights"])
    indices, weights = tensors[f"{side}_indices"], tensors[f"{side}_weights"]
    common.expect_shape(source, indices, (*shape[:-1], topk), f"top-k indices {where} with topk={topk}")
    common.expect_shape(source, weights, (*shape[:-1], topk - 1), f"the first topk-1 weights {where}")
    if indices.tensor.is_floating_point() or indices.tensor.dtype == torch.bool:
        raise InputError(f"{source.describe(indices.key)}: dtype {indices.tensor.dtype}; top-k indices are integers")
    index = indices.tensor.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= shape[-1]):
        raise InputError(f"{source.describe(indices.key)}: an index outside the bank of num_vectors={shape[-1]}")
    w = weights.tensor.to(torch.float32)
    w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
    rebuilt = torch.full(shape, float("-inf")).scatter(-1, index, torch.log(w))
    return AdapterTensor(f"{weights.key} & {indices.key} (logits rebuilt as PEFT loads them)", rebuilt)


METHOD = Method("vblora", ("VBLORA",), parse, ops=(VBLORA_WEIGHT,), fields=FIELDS)
