"""peftc's own parser for Hugging Face PEFT LoRA adapters (``peft_type: "LORA"``), DoRA included.

Every tensor key maps to exactly one thing, or the parse fails naming it:

* ``<m>.lora_A.weight`` / ``lora_B.weight`` / ``lora_B.bias`` → a LoRA site on module ``m``:
  a ``peftc::lora_linear`` call site for ``nn.Linear`` and GPT-2 ``Conv1D``; a ``lora_weight`` weight
  site for ``nn.Conv1d/2d/3d``; with ``use_dora``, a ``dora_weight`` site plus ``<m>.lora_magnitude_vector``;
* ``<m>.lora_embedding_A`` / ``lora_embedding_B`` → a weight site on an ``nn.Embedding``;
* ``nn.MultiheadAttention`` → weight sites on both of its projections (``mha.py``);
* ``<m>[.base_layer…].lora_A.weight`` for ``target_parameters`` → a weight site on a raw parameter;
  several targeted parameters of one module nest, the first registered one innermost;
* ``<m>.token_adapter.trainable_tokens_delta`` → replaced embedding rows (``trainable_token_indices``),
  also on every output layer tied to that embedding;
* trained biases and ``modules_to_save`` tensors → full replacements (``peftc.methods.common``).

``init_lora_weights`` ``pissa``/``olora`` adapters were trained on a residual base; peftc rebuilds it
exactly from the original weight (``residual.py``). Other base-modifying initialisations are refused
with how to convert them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleInfo, ModuleTable, conv_attributes
from peftc.methods import common, peft_config, trainable_tokens
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.lora import mha, residual
from peftc.methods.lora.dora import DORA_WEIGHT
from peftc.methods.lora.ops import LORA_BIAS, LORA_EXPERTS, LORA_LINEAR, LORA_WEIGHT, lora_scale
from peftc.quant.sites import QUANTIZED_CLASSES, lora_site

FIELDS = common.Fields(
    honoured=(
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "fan_in_fan_out",
        "lora_bias",
        "bias",
        "modules_to_save",
        "use_dora",
        "target_parameters",
        "trainable_token_indices",
        "init_lora_weights",
        "loftq_config",
    ),
    ignored={
        "lora_dropout": "dropout is the identity at inference",
        "megatron_config": "training parallelism",
        "megatron_core": "training parallelism",
        "eva_config": "initialisation only",
        "corda_config": "initialisation only (the init is checked through init_lora_weights)",
        "lora_ga_config": "initialisation only (the init is checked through init_lora_weights)",
        "runtime_config": "runtime memory options",
        "qalora_group_size": "only used with use_qalora",
        "ensure_weight_tying": "training-time tying of modules_to_save copies",
    },
    unsupported={
        "layer_replication": "layer_replication changes the model's topology",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is input-dependent",
        "use_qalora": "QA-LoRA (use_qalora) is not supported yet",
        "velora_config": "VeLoRA (velora_config) is not supported yet",
        "monteclora_config": "MonteCLoRA (monteclora_config) is not supported yet",
        "use_bdlora": "BD-LoRA (use_bdlora) is not supported yet",
        "arrow_config": "Arrow routing (arrow_config) is input-dependent",
        "kasa_config": "KaSA (kasa_config) is not supported yet",
    },
    defaults={"r": 8, "lora_alpha": 8, "bias": "none"},
)

CALL_TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
WEIGHT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Embedding")
ROLES = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_B.bias": "lora_B_bias",
    "lora_embedding_A": "lora_A",
    "lora_embedding_B": "lora_B",
    "lora_magnitude_vector": "magnitude",
    "token_adapter.trainable_tokens_delta": "tokens",
}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a LoRA adapter against the base model's modules.

    Args:
        options: ``base_residual`` — the base given to peftc already is the residual base a
            PiSSA/OLoRA/CorDA/LoRA-GA adapter was trained on, so no residual is rebuilt or refused;
            ``tied_embeddings`` — whether trainable token rows also go to a tied output layer.

    Raises:
        InputError: a tensor that maps to no module, a targeted module without tensors, or a shape
            that disagrees with the base or the config (the message names the key and both shapes).
        UnsupportedError: a config option or module type peftc does not implement, naming it.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "LORA", FIELDS)
    common.check_number(source, "r", "lora_alpha")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'lora_only'")
    if cfg.get("use_dora") and cfg.get("lora_bias"):
        raise InputError(f"{source.config_path}: use_dora with lora_bias is invalid (PEFT refuses it too)")
    base_residual = options.base_residual
    init = residual.check_init(source, base_residual)
    targets = cfg.get("target_modules")
    params = _targeted_parameters(cfg, modules)
    if targets is None and not params:
        raise InputError(f"{source.config_path}: LoRA config has neither target_modules nor target_parameters")

    grouped = common.group_keys(source, modules, _role_of(params))
    mha.fold_out_proj(source, grouped, modules)
    tokens = _token_modules(source, grouped, modules)
    site_modules = {p: t for p, t in grouped.modules.items() if p not in tokens and not p.startswith(_PARAM_MARK)}
    wanted = targeted(cfg, modules) if targets is not None else set()
    common.check_modules(source, common.Grouped(site_modules, [], []), modules, wanted)

    warnings: list[str] = []
    sites: list[Site] = []
    for path, tensors in sorted(site_modules.items()):
        sites += _module_sites(source, modules[path], tensors, modules, warnings)
    for key, tensors in sorted(grouped.modules.items()):
        if key.startswith(_PARAM_MARK):
            sites += _parameter_sites(source, key.removeprefix(_PARAM_MARK), tensors, modules, warnings)
    for path, entry in sorted(tokens.items()):
        spec = cfg["trainable_token_indices"]
        sites += trainable_tokens.sites(source, path, entry, spec, modules, options.tied_embeddings)
    replacements = list(grouped.replacements)
    if init in residual.REBUILT_INITS and not base_residual:
        replacements += residual.residuals(source, init, sites, modules)
    oracle_config = None
    if base_residual and (init.startswith(residual.REBUILT_INITS + residual.REFUSED_INITS) or cfg.get("loftq_config")):
        oracle_config = {**cfg, "init_lora_weights": True, "loftq_config": {}}
    return Adapter(
        name=source.name,
        method="dora" if cfg.get("use_dora") else "lora",
        source=source,
        sites=tuple(sites),
        replacements=tuple(replacements),
        unused=tuple(grouped.unused),
        honoured=honoured,
        ignored=ignored,
        warnings=tuple(warnings),
        oracle_config=oracle_config,
    )


def targeted(cfg: Mapping[str, Any], modules: ModuleTable) -> set[str]:
    """Modules the config's ``target_modules`` select (``all-linear`` resolved as PEFT does)."""
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # PEFT's "all-linear" leaves out the output layer (the LM head, and for SEQ_CLS the
        # classifier head). PEFT resolves it to explicit names when saving, so only hand-written
        # configs get here.
        heads = ("lm_head", "embed_out") + (("classifier", "score") if cfg.get("task_type") == "SEQ_CLS" else ())
        return {p for p, m in modules.items() if m.calls and m.class_name in CALL_TYPES and p not in heads}
    return common.targeted_modules(cfg, modules)


# --------------------------------------------------------------------------------------------
# keys

_PARAM_MARK = "param:"


def _targeted_parameters(cfg: Mapping[str, Any], modules: ModuleTable) -> dict[str, list[str]]:
    """owner module → its targeted raw parameters, in registration order (``target_parameters``)."""
    wanted = cfg.get("target_parameters") or []
    found: dict[str, list[str]] = {}
    for path, module in modules.items():
        for local in module.params:
            key = f"{path}.{local}"
            if any(key == t or key.endswith("." + t) for t in wanted):
                found.setdefault(path, []).append(local)
    return found


def _role_of(params: Mapping[str, list[str]]) -> common.RoleFn:
    plain = common.suffix_roles(ROLES)
    nested = re.compile(r"^(?P<owner>.+?)(?P<depth>(\.base_layer)*)\.(?P<role>lora_[AB])\.weight$")

    def role(path: str) -> tuple[str, str] | None:
        match = nested.match(path)
        if match and match["owner"] in params:
            # k targeted parameters nest k-1 deep; the first registered one is innermost.
            owned = params[match["owner"]]
            index = len(owned) - 1 - match["depth"].count(".base_layer")
            if 0 <= index < len(owned):
                return f"{_PARAM_MARK}{match['owner']}.{owned[index]}", match["role"]
        return plain(path)

    return role


# --------------------------------------------------------------------------------------------
# sites


def _rank_alpha(source: AdapterSource, key: str) -> tuple[int, float, float]:
    cfg = source.config
    r = peft_config.pattern_value(cfg.get("rank_pattern"), key, cfg.get("r", 8))
    r = common.check_rank(source, key, r)
    alpha = peft_config.pattern_value(cfg.get("alpha_pattern"), key, cfg.get("lora_alpha", 8))
    return r, alpha, lora_scale(r, alpha, bool(cfg.get("use_rslora", False)))


def _module_sites(
    source: AdapterSource,
    module: ModuleInfo,
    tensors: dict[str, AdapterTensor],
    modules: ModuleTable,
    warnings: list[str],
) -> list[Site]:
    if mha.is_attention(module):
        return mha.sites(source, module, tensors, modules, _rank_alpha, warnings)
    cfg = source.config
    path = module.path
    if module.class_name in QUANTIZED_CLASSES:  # QLoRA: peftc/quant/sites.py
        common.require_roles(source, path, tensors, ["lora_A", "lora_B"])
        return [lora_site(source, module, tensors, *_rank_alpha(source, path))]
    layout = common.layout(source, module, "LoRA", CALL_TYPES + WEIGHT_TYPES)
    common.require_roles(source, path, tensors, ["lora_A", "lora_B"] + (["magnitude"] if cfg.get("use_dora") else []))
    _check_extra_roles(source, path, tensors, layout)
    if layout in ("linear", "linear_t") and bool(cfg.get("fan_in_fan_out", False)) != (layout == "linear_t"):
        warnings.append(
            f"fan_in_fan_out={cfg.get('fan_in_fan_out', False)} but {path!r} is a {module.class_name}; "
            f"using fan_in_fan_out={layout == 'linear_t'} as PEFT does"
        )
    r, alpha, scale = _rank_alpha(source, path)
    info = {"module_type": module.class_name, "r": r, "alpha": alpha}
    _check_shapes(source, module, tensors, modules, layout, r)
    a, b = tensors["lora_A"], tensors["lora_B"]
    if cfg.get("use_dora"):
        dora = {"lora_A": a, "lora_B": b, "magnitude": tensors["magnitude"]}
        return [Site(path, DORA_WEIGHT.name, dora, {"scale": scale, "layout": layout}, info, "weight")]
    if layout in ("conv", "embedding"):
        sites = [
            Site(path, LORA_WEIGHT.name, {"lora_A": a, "lora_B": b}, {"scale": scale, "layout": layout}, info, "weight")
        ]
        if "lora_B_bias" in tensors:
            if "bias" not in module.params:
                raise UnsupportedError(
                    f"{source.describe(tensors['lora_B_bias'].key)}: lora_bias on {path!r}, which has no bias"
                )
            sites.append(
                Site(path, LORA_BIAS.name, {"lora_B_bias": tensors["lora_B_bias"]}, {"scale": scale}, info, "bias")
            )
        return sites
    call_tensors = {role: tensors.get(role) for role in LORA_LINEAR.tensor_roles}
    call_scalars = {"scale": scale, "fan_in_fan_out": layout == "linear_t"}
    forms = LORA_LINEAR.weight_sites(call_tensors, call_scalars)
    # Without a base bias there is no parameter to transform: such a call site cannot stack.
    stackable = all(param in module.params for param, *_ in forms)
    weight_form = tuple(Site(path, op.name, t, s, info, param) for param, op, t, s in forms) if stackable else ()
    return [Site(path, LORA_LINEAR.name, call_tensors, call_scalars, info, weight_form=weight_form)]


def _check_shapes(
    source: AdapterSource,
    module: ModuleInfo,
    tensors: dict[str, AdapterTensor],
    modules: ModuleTable,
    layout: str,
    r: int,
) -> None:
    """The factors (and a DoRA magnitude, a ``lora_B.bias``) fit the module's weight at rank ``r``."""
    path = module.path
    weight_key = module.params["weight"]
    w_shape = modules.state_shapes[weight_key]
    a, b = tensors["lora_A"], tensors["lora_B"]
    base = f"(base weight {weight_key} {list(w_shape)})"
    if layout == "conv":
        _check_conv(source, module, path)
        kernel = tuple(w_shape[2:])
        common.expect_shape(
            source, a, (r, w_shape[1], *kernel), f"[r={r}, d_in={w_shape[1]}, *kernel={list(kernel)}] {base}"
        )
        common.expect_shape(
            source, b, (w_shape[0], r, *(1,) * len(kernel)), f"[d_out={w_shape[0]}, r={r}, 1, …] {base}"
        )
    else:
        d_in, d_out = common.io_dims(modules, module, layout)
        common.expect_shape(
            source, a, (r, d_in), f"[r={r}, {'num' if layout == 'embedding' else 'd_in'}={d_in}] {base}"
        )
        common.expect_shape(
            source, b, (d_out, r), f"[{'dim' if layout == 'embedding' else 'd_out'}={d_out}, r={r}] {base}"
        )
    if layout == "embedding":
        _check_embedding(source, module, path)
    if "lora_B_bias" in tensors:
        common.expect_shape(
            source, tensors["lora_B_bias"], (w_shape[0] if layout != "linear_t" else w_shape[1],), "[d_out]"
        )
    if "magnitude" in tensors:
        out = w_shape[1] if layout in ("linear_t", "embedding") else w_shape[0]
        m = tensors["magnitude"]
        if m.tensor.numel() != out:
            raise InputError(
                f"{source.describe(m.key)}: DoRA magnitude has {m.tensor.numel()} elements {list(m.tensor.shape)}, "
                f"but module {path!r} has {out} output channels {base}"
            )


def _check_extra_roles(source: AdapterSource, path: str, tensors: Mapping[str, AdapterTensor], layout: str) -> None:
    cfg = source.config
    keys = {role: t.key for role, t in tensors.items()}
    if "lora_B_bias" in tensors and not cfg.get("lora_bias"):
        raise InputError(
            f"{source.describe(keys['lora_B_bias'])}: lora_B.bias present but {source.config_path.name} has lora_bias=false"
        )
    if cfg.get("lora_bias") and "lora_B_bias" not in tensors and layout != "embedding":
        raise InputError(f"{source.weights_path}: lora_bias=true but module {path!r} has no lora_B.bias")
    if "magnitude" in tensors and not cfg.get("use_dora"):
        raise InputError(
            f"{source.describe(keys['magnitude'])}: a DoRA magnitude, but {source.config_path.name} has use_dora=false"
        )
    embedding_keys = any(k.endswith(("lora_embedding_A", "lora_embedding_B")) for k in keys.values())
    if embedding_keys != (layout == "embedding"):
        raise InputError(
            f"{source.describe(keys['lora_A'])}: {'embedding' if embedding_keys else 'linear/conv'} LoRA keys on "
            f"module {path!r}, which is {'not ' if embedding_keys else ''}an embedding"
        )


def _check_conv(source: AdapterSource, module: ModuleInfo, path: str) -> None:
    attrs = conv_attributes(module) or {}
    if attrs.get("groups", 1) != 1:
        raise UnsupportedError(
            f"{source.config_path.name}: LoRA on grouped convolution {path!r} (groups={attrs['groups']}) cannot be "
            "merged exactly (PEFT refuses to merge it too)"
        )
    if any(d != 1 for d in attrs.get("dilation", ())):
        raise UnsupportedError(f"{source.config_path.name}: LoRA on dilated convolution {path!r} fails in PEFT itself")
    if attrs.get("extra_ops"):
        raise UnsupportedError(
            f"{source.config_path.name}: LoRA on {path!r}, whose padding_mode is not 'zeros': PEFT pads the LoRA branch "
            "with zeros, so its merged and unmerged models differ"
        )


def _check_embedding(source: AdapterSource, module: ModuleInfo, path: str) -> None:
    ops = {n.target.__name__ if hasattr(n.target, "__name__") else str(n.target) for c in module.calls for n in c.nodes}
    if any("renorm" in op for op in ops):
        raise UnsupportedError(
            f"{source.config_path.name}: LoRA on embedding {path!r} with max_norm (PEFT renormalises in place)"
        )


def _parameter_sites(
    source: AdapterSource, key: str, tensors: dict[str, AdapterTensor], modules: ModuleTable, warnings: list[str]
) -> list[Site]:
    """LoRA on a raw parameter (``target_parameters``): 2-D ``[d_out, d_in]`` or 3-D experts."""
    owner, _, local = key.rpartition(".")
    common.require_roles(source, key, tensors, ["lora_A", "lora_B"])
    shape = modules.state_shapes[modules[owner].params[local]]
    r, alpha, scale = _rank_alpha(source, key)
    a, b = tensors["lora_A"], tensors["lora_B"]
    info = {"module_type": f"parameter {local}", "r": r, "alpha": alpha}
    if len(shape) == 2:
        common.expect_shape(source, a, (r, shape[1]), f"[r={r}, d_in={shape[1]}] (parameter {key} {list(shape)})")
        common.expect_shape(source, b, (shape[0], r), f"[d_out={shape[0]}, r={r}] (parameter {key} {list(shape)})")
        return [
            Site(owner, LORA_WEIGHT.name, {"lora_A": a, "lora_B": b}, {"scale": scale, "layout": "linear"}, info, local)
        ]
    if len(shape) != 3:
        raise UnsupportedError(
            f"{source.describe(a.key)}: target_parameters on {key} of rank {len(shape)}; PEFT supports 2-D and 3-D"
        )
    experts, d1, d2 = shape
    d_in, d_out = a.tensor.shape[1], b.tensor.shape[0]
    transposed = (d1, d2) == (d_in, d_out) and d1 != d2
    if (d1, d2) not in ((d_out, d_in), (d_in, d_out)):
        raise InputError(
            f"{source.describe(a.key)}: factors [{d_out}, {d_in}] do not fit parameter {key} {list(shape)}"
        )
    if d1 == d2:
        warnings.append(f"{key} is square; assuming PEFT's default [experts, d_out, d_in] layout (is_transposed=False)")
    common.expect_shape(source, a, (r * experts, d_in), f"[r·experts={r * experts}, d_in={d_in}] (parameter {key})")
    common.expect_shape(source, b, (d_out, r * experts), f"[d_out={d_out}, r·experts={r * experts}] (parameter {key})")
    scalars = {"scale": scale, "transposed": transposed}
    return [Site(owner, LORA_EXPERTS.name, {"lora_A": a, "lora_B": b}, scalars, info, local)]


def _token_modules(source: AdapterSource, grouped: common.Grouped, modules: ModuleTable) -> dict[str, AdapterTensor]:
    found = {path: t["tokens"] for path, t in grouped.modules.items() if "tokens" in t}
    if found and not source.config.get("trainable_token_indices"):
        key = next(iter(found.values())).key
        raise InputError(f"{source.describe(key)}: trainable token rows but no trainable_token_indices in the config")
    return found
