"""peftc's own parser for Hugging Face PEFT LoRA adapters (``peft_type: "LORA"``).

Every tensor key is mapped to exactly one thing, or the parse fails naming it:

* ``<module>.lora_A.weight`` / ``lora_B.weight`` / ``lora_B.bias`` → a ``peftc::lora_linear`` site;
* ``<module>.base_layer.bias`` or ``<module>.bias`` (``bias: all`` / ``lora_only``) → a trained base bias;
* ``<module>.<param>`` under a ``modules_to_save`` module → a full replacement of that base parameter;
* ``<module>.modules_to_save.<p>`` / ``<module>.original_module.<p>`` (written when ``bias: all`` meets
  ``modules_to_save``) → recorded as unused: PEFT does not read them either.

Keys carry PEFT's ``base_model.model.`` prefix (stripped) and no adapter name. Every config field is
classified: it changes the math and is honoured, it does not affect inference and is recorded, or
it changes the math in a way peftc does not implement yet and raises :class:`UnsupportedError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import peft_config
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, Replacement, Site
from peftc.ops.lora import LORA_LINEAR, lora_scale

PREFIX = "base_model.model."

HONOURED = (
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "lora_bias",
    "bias", "modules_to_save",
)  # fmt: skip

# Fields that never change what a trained adapter computes at inference.
IGNORED = {
    "peft_type": "selects the method",
    "task_type": "describes the training task",
    "auto_mapping": "records the training-time model class",
    "peft_version": "records the PEFT version that saved the adapter",
    "base_model_name_or_path": "a training-time path; the base model is the one given to peftc",
    "revision": "a training-time hub revision",
    "inference_mode": "training flag",
    "lora_dropout": "dropout is the identity at inference",
    "init_lora_weights": "initialisation only (the trained tensors are in the file)",
    "megatron_config": "training parallelism",
    "megatron_core": "training parallelism",
    "loftq_config": "initialisation only",
    "eva_config": "initialisation only",
    "corda_config": "initialisation only",
    "lora_ga_config": "initialisation only",
    "runtime_config": "runtime memory options",
    "qalora_group_size": "only used with use_qalora",
    "ensure_weight_tying": "training-time tying of modules_to_save copies",
}

# Fields that change the math in ways this parser does not implement, with what to do instead.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not supported yet; merge it with PEFT's merge_and_unload() first",
    "layer_replication": "layer_replication changes the model's topology",
    "trainable_token_indices": "trainable_token_indices (sparse embedding rows) is not supported yet",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported yet",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is input-dependent",
    "use_qalora": "QA-LoRA (use_qalora) is not supported yet",
    "velora_config": "VeLoRA (velora_config) is not supported yet",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported yet",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported yet",
    "arrow_config": "Arrow routing (arrow_config) is input-dependent",
    "kasa_config": "KaSA (kasa_config) is not supported yet",
}

# init_lora_weights values whose adapters only reproduce the fine-tuned model on a modified base.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

LINEAR_TYPES = {"Linear": False, "NonDynamicallyQuantizableLinear": False, "Conv1D": True}
_SITE_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")
_OTHER_LORA_KEY = re.compile(r"\.(lora_embedding_[AB]|lora_magnitude_vector|lora_[A-Z])(\.|$)")
_ROLES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_B.bias": "lora_B_bias"}


def parse(source: AdapterSource, modules: ModuleTable) -> Adapter:
    """Interpret a LoRA adapter against the base model's modules.

    Raises:
        InputError: a tensor that maps to no module, a targeted module without tensors, or a shape
            that disagrees with the base or the config (the message names the key and both shapes).
        UnsupportedError: a config option peftc does not implement, naming it.
    """
    cfg = source.config
    honoured, ignored = _classify_fields(source)
    warnings: list[str] = []
    targeted = {p for p, m in modules.items() if m.calls and peft_config.is_target(cfg, p)}
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: LoRA config has no target_modules")
    if isinstance(cfg["target_modules"], str) and cfg["target_modules"].lower() == "all-linear":
        targeted = {p for p, m in modules.items() if m.calls and m.class_name in LINEAR_TYPES}
        targeted -= {p for p in targeted if _all_linear_excluded(p, cfg)}

    groups: dict[str, dict[str, AdapterTensor]] = {}
    replacements: list[Replacement] = []
    unused: list[tuple[str, str]] = []
    for key, tensor in source.tensors.items():
        path = key.removeprefix(PREFIX)
        match = _SITE_KEY.match(path)
        if match:
            groups.setdefault(match["module"], {})[_ROLES[match["role"]]] = AdapterTensor(key, tensor)
            continue
        other = _OTHER_LORA_KEY.search(path)
        if other:
            raise UnsupportedError(
                f"{source.describe(key)}: {other.group(1)} tensors are not supported yet "
                "(LoRA on Embedding/Conv modules and DoRA come with the multi-method support)"
            )
        replacement, why_unused = _classify_full_tensor(source, key, path, modules)
        if replacement is not None:
            replacements.append(replacement)
        else:
            unused.append((key, why_unused))

    for module_path, tensors in sorted(groups.items()):
        # A key naming no module is the likelier mistake (a typo, another model); report it first.
        if module_path not in modules or not modules[module_path].calls:
            key = next(iter(tensors.values())).key
            raise InputError(
                f"{source.describe(key)}: maps to module {module_path!r}, which the base model does not "
                f"execute{_nearest(module_path, modules)}"
            )
    sites = []
    for module_path, tensors in sorted(groups.items()):
        sites.append(_site(source, module_path, tensors, modules, targeted, warnings))
    missing = sorted(targeted - set(groups))
    if missing:
        raise InputError(
            f"{source.weights_path}: module {missing[0]!r} is targeted by {source.config_path.name} "
            f"(target_modules={cfg.get('target_modules')!r}) but the file has no lora_A/lora_B for it"
            + (f" ({len(missing) - 1} more modules likewise)" if len(missing) > 1 else "")
        )
    return Adapter(
        name=source.name,
        method="lora",
        source=source,
        sites=tuple(sites),
        replacements=tuple(replacements),
        unused=tuple(unused),
        honoured=honoured,
        ignored=ignored,
        warnings=tuple(warnings),
    )


def _classify_fields(source: AdapterSource) -> tuple[dict[str, Any], dict[str, str]]:
    cfg = source.config
    where = source.config_path
    if cfg.get("peft_type") != "LORA":
        raise UnsupportedError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for field, why in UNSUPPORTED.items():
        if cfg.get(field) not in (None, False, [], {}, ""):
            raise UnsupportedError(f"{where}: {field}={cfg[field]!r}: {why}")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_MODIFYING_INITS):
        raise UnsupportedError(
            f"{where}: init_lora_weights={cfg['init_lora_weights']!r} trains against a modified "
            "(residual) base, so merging into the original base would be silently wrong; convert it "
            "to a plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) "
            "and set init_lora_weights to true"
        )
    unknown = {
        k: v
        for k, v in cfg.items()
        if k not in HONOURED and k not in IGNORED and k not in UNSUPPORTED and v not in (None, False, [], {}, "")
    }
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unknown.items()))
        raise UnsupportedError(f"{where}: fields peftc does not know and that may change the math: {listed}")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InputError(f"{where}: bias={cfg['bias']!r}; expected 'none', 'all' or 'lora_only'")
    for field in ("r", "lora_alpha"):
        if field in cfg and not isinstance(cfg[field], (int, float)):
            raise InputError(f"{where}: {field}={cfg[field]!r} is not a number")
    honoured = {k: cfg.get(k) for k in HONOURED}
    honoured["r"] = cfg.get("r", 8)
    honoured["lora_alpha"] = cfg.get("lora_alpha", 8)
    ignored = {k: IGNORED[k] for k in cfg if k in IGNORED}
    ignored.update({k: "not set" for k in cfg if k in UNSUPPORTED})
    return honoured, ignored


def _site(
    source: AdapterSource,
    path: str,
    tensors: dict[str, AdapterTensor],
    modules: ModuleTable,
    targeted: set[str],
    warnings: list[str],
) -> Site:
    cfg = source.config
    some_key = next(iter(tensors.values())).key
    module = modules[path]
    if path not in targeted:
        raise InputError(
            f"{source.describe(some_key)}: module {path!r} is not targeted by {source.config_path.name} "
            f"(target_modules={cfg.get('target_modules')!r}, exclude_modules={cfg.get('exclude_modules')!r}, "
            f"layers_to_transform={cfg.get('layers_to_transform')!r})"
        )
    if module.class_name not in LINEAR_TYPES:
        raise UnsupportedError(
            f"{source.describe(some_key)}: LoRA on {module.class_name} (module {path!r}) is not "
            "supported yet; supported: nn.Linear and transformers Conv1D"
        )
    for role in ("lora_A", "lora_B"):
        if role not in tensors:
            raise InputError(f"{source.weights_path}: module {path!r} has no {role}.weight")
    if "lora_B_bias" in tensors and not cfg.get("lora_bias"):
        raise InputError(
            f"{source.describe(tensors['lora_B_bias'].key)}: lora_B.bias present but "
            f"{source.config_path.name} has lora_bias=false"
        )
    if cfg.get("lora_bias") and "lora_B_bias" not in tensors:
        raise InputError(f"{source.weights_path}: lora_bias=true but module {path!r} has no lora_B.bias")

    fan_in_fan_out = LINEAR_TYPES[module.class_name]
    if bool(cfg.get("fan_in_fan_out", False)) != fan_in_fan_out:
        warnings.append(
            f"fan_in_fan_out={cfg.get('fan_in_fan_out', False)} but {path!r} is a {module.class_name}; "
            f"using fan_in_fan_out={fan_in_fan_out} as PEFT does"
        )
    weight_key = module.params.get("weight")
    if weight_key is None:
        raise InputError(f"module {path!r} has no weight parameter in the base model")
    w_shape = modules.state_shapes[weight_key]
    d_in, d_out = (w_shape[0], w_shape[1]) if fan_in_fan_out else (w_shape[1], w_shape[0])
    a, b = tensors["lora_A"], tensors["lora_B"]
    r = int(peft_config.pattern_value(cfg.get("rank_pattern"), path, cfg.get("r", 8)))
    alpha = peft_config.pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", 8))
    _expect(source, a, 2, (r, d_in), f"[r={r}, d_in={d_in}] (base weight {weight_key} {list(w_shape)})")
    _expect(source, b, 2, (d_out, r), f"[d_out={d_out}, r={r}] (base weight {weight_key} {list(w_shape)})")
    if "lora_B_bias" in tensors:
        _expect(source, tensors["lora_B_bias"], 1, (d_out,), f"[d_out={d_out}]")
    scale = lora_scale(r, alpha, bool(cfg.get("use_rslora", False)))
    ordered = {role: tensors.get(role) for role in LORA_LINEAR.tensor_roles}
    return Site(
        module=path,
        op=LORA_LINEAR.name,
        tensors=ordered,
        scalars={"scale": scale, "fan_in_fan_out": fan_in_fan_out},
        info={"module_type": module.class_name, "r": r, "alpha": alpha},
    )


def _expect(source: AdapterSource, t: AdapterTensor, ndim: int, shape: tuple[int, ...], what: str) -> None:
    if t.tensor.ndim != ndim or tuple(t.tensor.shape) != shape:
        raise InputError(
            f"{source.describe(t.key)}: shape {list(t.tensor.shape)} does not match the base model: expected {what}"
        )


def _classify_full_tensor(
    source: AdapterSource, key: str, path: str, modules: ModuleTable
) -> tuple[Replacement | None, str]:
    """A non-LoRA key: a trained bias, a modules_to_save tensor, or an unused duplicate."""
    cfg = source.config
    owner, _, local = path.rpartition(".")
    save = cfg.get("modules_to_save") or []
    for marker in (".modules_to_save", ".original_module"):
        if owner.endswith(marker) and peft_config.in_modules_to_save(save, owner.removesuffix(marker)):
            return None, (
                f"duplicate {marker[1:]} copy written by PEFT when bias={cfg.get('bias')!r} meets "
                "modules_to_save; PEFT does not load it either"
            )
    owner = owner.removesuffix(".base_layer")
    module = modules.get(owner)
    param = module.params.get(local) if module else None
    if param is None:
        raise InputError(
            f"{source.describe(key)}: maps to no module or parameter of the base model "
            f"(looked for {owner}.{local}){_nearest(owner, modules)}"
        )
    if peft_config.in_modules_to_save(save, owner):
        reason = "modules_to_save"
    elif local == "bias" and cfg.get("bias", "none") != "none":
        reason = f"bias={cfg['bias']}"
    else:
        raise InputError(
            f"{source.describe(key)}: a full tensor for {param}, but {source.config_path.name} neither "
            f"lists {owner!r} in modules_to_save nor trains biases (bias={cfg.get('bias', 'none')!r})"
        )
    expected = modules.state_shapes[param]
    tensor = source.tensors[key]
    if tuple(tensor.shape) != expected:
        raise InputError(
            f"{source.describe(key)}: shape {list(tensor.shape)} does not match base parameter {param} {list(expected)}"
        )
    return Replacement(param, AdapterTensor(key, tensor), reason), ""


def _all_linear_excluded(path: str, cfg: Mapping[str, Any]) -> bool:
    """PEFT's "all-linear" leaves out the output layer: the LM head, and for ``task_type: SEQ_CLS``
    the classifier head. (PEFT resolves "all-linear" to explicit names when saving, so this only
    applies to hand-written configs.)"""
    heads = ("lm_head", "embed_out") + (("classifier", "score") if cfg.get("task_type") == "SEQ_CLS" else ())
    return path in heads


def _nearest(path: str, modules: ModuleTable) -> str:
    import difflib

    close = difflib.get_close_matches(path, list(modules), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
