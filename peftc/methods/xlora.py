"""X-LoRA (PEFT ``XLORA``): a mixture of LoRA experts gated per token and per layer by a classifier.

The saved adapter is ``adapter_config.json`` (``adapters``: expert name → LoRA adapter directory, the
names ``"0"``, ``"1"``, … in order, as PEFT's ``XLoraModel`` loads them) and a weights file holding only
the classifier, ``base_model.internal_xlora_classifier.layers.<i>.{weight,bias}``. PEFT's eager forward
(``peft/tuners/xlora/{model,classifier,layer}.py``) for inputs ``x`` with experts ``e = 0…E-1`` and the
``L`` modules any expert adapts, numbered ``l`` in the model's module order::

    scaling pass:  the model with every module's gates g = v (scaling_pass_value), output_hidden_states
    h      = hidden_states[-1] of that pass                        [b, s, hidden_size]
    logits = Linear(ReLU(Linear(…h)))  (xlora_depth linears)       [b, s, E·L] or [b, s, E]
    S      = logits as [b, s, L, E] (broadcast over L unless layerwise_scalings)
    S      = softmax(S / softmax_temperature) over E               (enable_softmax)
    main pass:     each adapted module l:  y = W x + b + Σ_e w · scale_e · B_e A_e (x ⊙ g_e)
                   g = S[:, :, l, :], top_k_lora largest kept (others 0), then softmax over the kept
                   ones (enable_softmax_topk); w = global_scaling_weight, scale_e the expert's LoRA scale

In the scaling pass the experts run too (PEFT's ``disable_adapter_layers`` does not reach the X-LoRA
layers), gated by ``v`` (0 by default: they add nothing, and peftc skips them). The gates depend on
each token's activations, so there is no weight form: the adapter is *inserted* — the base is traced
inside :class:`~peftc.methods.xlora_model.TwoPass`, which runs it twice — as Poly's router is, in
merged and unmerged compiles alike. Experts are read with peftc's LoRA parser (data only: safetensors) and must
be plain LoRA on ``nn.Linear`` (PEFT's X-LoRA layers refuse DoRA; peftc also refuses lora_bias,
modules_to_save and other module types, which it does not lower here).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from peftc import reading
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable, module_table_from_module
from peftc.loaders.inputs import InputSignature
from peftc.methods import common, lora
from peftc.methods.base import Adapter, AdapterSource, ParseOptions
from peftc.methods.lora.ops import LORA_LINEAR
from peftc.methods.prompt.wrapper import INPUTS
from peftc.methods.record import Inserted, Method
from peftc.methods.xlora_model import Experts, Gates, Routing, TwoPass

PREFIX = "base_model.internal_xlora_classifier.layers."
FIELDS = common.Fields(
    honoured=(
        "adapters", "hidden_size", "xlora_depth", "xlora_size", "xlora_dropout_p", "layerwise_scalings",
        "enable_softmax", "softmax_temperature", "top_k_lora", "enable_softmax_topk", "scaling_pass_value",
        "global_scaling_weight", "task_type",
    ),
    ignored={"use_trainable_adapters": "training only (which tensors get gradients)"},
    defaults={
        "xlora_depth": 1, "xlora_size": 2048, "xlora_dropout_p": 0.2, "layerwise_scalings": False,
        "enable_softmax": True, "softmax_temperature": 1.0, "enable_softmax_topk": False,
        "scaling_pass_value": 0.0, "global_scaling_weight": 1.0,
    },
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Expert:
    """One expert adapter: its source and, per adapted module, ``(lora_A, lora_B, scale)``."""

    name: str
    source: AdapterSource
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything :class:`TwoPass` needs, checked against the config and the model."""

    experts: tuple[Expert, ...]
    paths: tuple[str, ...]
    """The adapted modules in the model's module order (PEFT's layer numbers)."""
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    routing: Routing


def expert_paths(source: AdapterSource) -> dict[str, Path]:
    """Each expert's directory, as PEFT reads it: the config's path, absolute or relative to the working
    directory (the copies ``save_pretrained`` writes beside the config also hold classifier tensors).

    Raises:
        UnsupportedError: names other than ``"0"``, ``"1"``, … in order (PEFT's model then fails).
        InputError: no experts, or no LoRA adapter at an expert's path.
    """
    adapters = source.config.get("adapters")
    where = source.config_path
    if not isinstance(adapters, dict) or not adapters:
        raise InputError(f"{where}: adapters={adapters!r}; give the expert LoRA directories by name")
    names = list(adapters)
    if names != [str(i) for i in range(len(names))]:
        raise UnsupportedError(
            f"{where}: adapters named {names}; PEFT's XLoraModel loads expert i as '{{i}}' and fails unless the "
            "names are '0', '1', … in order"
        )
    found = {}
    for name, value in adapters.items():
        path = Path(str(value))
        if not (path / "adapter_config.json").exists():
            raise InputError(f"{where}: expert {name!r}: no LoRA adapter at {value!r}")
        found[name] = path.resolve()
    return found


def _routing(source: AdapterSource, n_experts: int, n_layers: int) -> Routing:
    cfg, where = source.config, source.config_path
    get = {k: cfg.get(k, v) if cfg.get(k) is not None else v for k, v in FIELDS.defaults.items()}.get
    common.check_number(source, "softmax_temperature", "scaling_pass_value", "global_scaling_weight")
    if get("softmax_temperature") <= 0:
        raise InputError(f"{where}: softmax_temperature={get('softmax_temperature')!r}; give a number > 0")
    top_k = cfg.get("top_k_lora")
    if top_k is not None:
        top_k = common.positive_int(source, "top_k_lora", 1)
        if top_k > n_experts:
            raise InputError(f"{where}: top_k_lora={top_k} is more than the {n_experts} experts")
        if get("scaling_pass_value") != 0 and top_k < n_experts:
            raise UnsupportedError(
                f"{where}: top_k_lora={top_k} with scaling_pass_value={get('scaling_pass_value')}: PEFT takes the "
                "top k of equal gates in the scaling pass (the choice among ties is unspecified); peftc does not lower it"
            )
    flags = ("layerwise_scalings", "enable_softmax", "enable_softmax_topk")
    for flag in flags:
        if not isinstance(get(flag), bool):
            raise InputError(f"{where}: {flag}={get(flag)!r}; give true or false")
    return Routing(
        n_experts, n_layers, get("layerwise_scalings"), get("enable_softmax"), float(get("softmax_temperature")),
        top_k, get("enable_softmax_topk"), float(get("scaling_pass_value")), float(get("global_scaling_weight")),
    )  # fmt: skip


def _read_expert(name: str, path: Path) -> AdapterSource:
    """Expert ``name``'s config and tensors (``adapter_model.safetensors`` only: data, never pickle)."""
    config_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights.exists():
        raise InputError(f"{path}: X-LoRA expert {name!r} has no adapter_model.safetensors")
    cfg, raw = reading.read_json(config_path)
    if not isinstance(cfg, dict):
        raise InputError(f"{config_path}: expected a JSON object, got {type(cfg).__name__}")
    tensors, digest = reading.read_safetensors(weights)
    reading.check_finite(tensors, weights.name)
    sha = {"config": hashlib.sha256(raw).hexdigest(), "weights": digest}
    return AdapterSource(f"xlora_expert_{name}", path, config_path, weights, cfg, tensors, sha)


def _expert(name: str, path: Path, modules: ModuleTable) -> Expert:
    """Expert ``name`` read from ``path`` by peftc's LoRA parser; plain LoRA on ``nn.Linear`` only."""
    source = _read_expert(name, path)
    where = source.config_path
    if source.config.get("peft_type") != "LORA":
        raise UnsupportedError(f"{where}: X-LoRA expert {name!r} is a {source.config.get('peft_type')} adapter; "
                               "X-LoRA mixes LoRA experts")  # fmt: skip
    if source.config.get("use_dora"):
        raise UnsupportedError(f"{where}: X-LoRA expert {name!r} uses DoRA; PEFT's X-LoRA layers refuse it")
    parsed = lora.parse.parse(source, modules, ParseOptions())
    if parsed.replacements:
        raise UnsupportedError(
            f"{source.describe(parsed.replacements[0].tensor.key)}: X-LoRA expert {name!r} replaces "
            f"{parsed.replacements[0].param} ({parsed.replacements[0].reason}); peftc lowers X-LoRA experts that "
            "only add LoRA factors"
        )
    factors = {}
    for site in parsed.sites:
        if not site.module.startswith("model.") or site.module.startswith("model.model."):
            raise UnsupportedError(
                f"{where}: X-LoRA expert {name!r} adapts {site.module}; PEFT's XLoraModel renames expert keys to "
                "'model.model.<…>' and loads them only for models whose layers are under 'model.' (LlamaForCausalLM "
                "and the like; not BertModel), so it cannot run this X-LoRA and peftc does not compile it"
            )
        a, b, bias = (site.tensors.get(r) for r in ("lora_A", "lora_B", "lora_B_bias"))
        if (
            site.op != LORA_LINEAR.name
            or site.scalars.get("fan_in_fan_out")
            or site.info.get("module_type") != "Linear"
        ):
            raise UnsupportedError(f"{where}: X-LoRA expert {name!r} adapts {site.module} "
                                   f"({site.info.get('module_type')}); peftc lowers X-LoRA on nn.Linear only")  # fmt: skip
        if bias is not None:
            raise UnsupportedError(f"{source.describe(bias.key)}: X-LoRA expert {name!r} has lora_bias; peftc "
                                   "lowers X-LoRA experts without it")  # fmt: skip
        factors[site.module] = (a.tensor, b.tensor, float(site.scalars["scale"]))
    return Expert(name, source, factors)


def _classifier(source: AdapterSource, routing: Routing, width: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The classifier's linears from the weights file, shapes checked (``Sequential`` indices step over
    ReLU and, with ``xlora_dropout_p > 0``, Dropout)."""
    cfg = source.config
    depth = common.positive_int(source, "xlora_depth", 1)
    size = common.positive_int(source, "xlora_size", 2048) if depth > 1 else None
    hidden = common.positive_int(source, "hidden_size", 4096)
    if hidden != width:
        raise InputError(f"{source.config_path}: hidden_size={hidden}; the model's hidden states are {width} wide")
    dropout = cfg.get("xlora_dropout_p")
    step = 3 if (0.2 if dropout is None else dropout) > 0 else 2  # Linear, ReLU[, Dropout]
    out = routing.n_experts * (routing.n_layers if routing.layerwise else 1)
    widths = [hidden] + [size] * (depth - 1) + [out]
    layers = []
    for index in range(depth):
        key = f"{PREFIX}{index * step}"
        pair = []
        for part, shape in (("weight", (widths[index + 1], widths[index])), ("bias", (widths[index + 1],))):
            tensor = source.tensors.get(f"{key}.{part}")
            if tensor is None:
                raise InputError(
                    f"{source.weights_path}: no {f'{key}.{part}'!r} tensor (xlora_depth={depth}); PEFT's own save drops "
                    "classifier keys that contain '.<expert name>.' — save the classifier's state_dict yourself"
                )
            if tuple(tensor.shape) != shape:
                raise InputError(f"{source.describe(f'{key}.{part}')}: shape {list(tensor.shape)}, expected "
                                 f"{list(shape)} (hidden_size, xlora_size, experts × layers)")  # fmt: skip
            pair.append(tensor)
        layers.append((pair[0], pair[1]))
    other = sorted(set(source.tensors) - {f"{PREFIX}{i * step}.{p}" for i in range(depth) for p in ("weight", "bias")})
    if other:
        raise InputError(f"{source.describe(other[0])}: not a tensor of the X-LoRA classifier")
    return tuple(layers)


def read(source: AdapterSource, module: torch.nn.Module) -> Spec:
    """The experts, the adapted modules in PEFT's order, the classifier and the routing options.

    Raises:
        UnsupportedError: a refused option or expert (see the module docstring).
        InputError: a missing expert, a bad field, or a missing or misshapen classifier tensor.
    """
    common.classify_fields(source, "XLORA", FIELDS)
    table = module_table_from_module(module)
    experts = tuple(_expert(name, path, table) for name, path in expert_paths(source).items())
    adapted = {path for e in experts for path in e.factors}
    paths = tuple(name for name, _ in module.named_modules() if name in adapted)
    routing = _routing(source, len(experts), len(paths))
    config = getattr(module, "config", None)
    width = getattr(config, "hidden_size", None)
    if width is None:
        raise UnsupportedError(f"{source.config_path}: X-LoRA's classifier reads the model's hidden_states; "
                               f"{type(module).__name__} is not a transformers model with a hidden_size")  # fmt: skip
    return Spec(experts, paths, _classifier(source, routing, int(width)), routing)


def insert(source: AdapterSource, module: torch.nn.Module, base: InputSignature) -> Inserted:
    """:class:`TwoPass` around ``module``, with the base's text inputs.

    Raises:
        UnsupportedError: inputs other than ``input_ids`` (+ ``attention_mask``, ``token_type_ids``);
            see :func:`read`.
        InputError: see :func:`read`.
    """
    spec = read(source, module)
    names = [i.name for i in base.inputs]
    if "input_ids" not in names or any(n not in INPUTS for n in names):
        raise UnsupportedError(f"{source.config_path}: XLORA wires {', '.join(INPUTS)}; the model takes {names}")

    def wrap(traced: torch.nn.Module) -> torch.nn.Module:
        dtype = next((p.dtype for p in traced.parameters() if p.is_floating_point()), torch.float32)
        gates = Gates([(w.to(dtype), b.to(dtype)) for w, b in spec.layers], spec.routing)
        experts = [
            Experts(
                [(i, *e.factors[p]) for i, e in enumerate(spec.experts) if p in e.factors], spec.routing.global_weight
            )
            for p in spec.paths
        ]
        return TwoPass(traced, list(spec.paths), experts, gates)

    return Inserted(wrap, base)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """The adapter, found in the program :class:`TwoPass` was traced in: no sites.

    Raises:
        UnsupportedError: the program was not traced with the adapter's wrapper, or a refused field.
        InputError: see :func:`read`.
    """
    honoured, ignored = common.classify_fields(source, "XLORA", FIELDS)
    paths = expert_paths(source)
    first = source.tensors.get(f"{PREFIX}0.weight")
    traced = modules.tensors.get("xlora_gates.linears.0.weight")
    if first is None or traced is None or traced.shape != first.shape or not torch.equal(traced.float(), first.float()):
        raise UnsupportedError(
            f"{source.config_path}: an XLORA adapter is inserted when peftc traces the model (compile it alone); "
            "it cannot be added to a program traced without it"
        )
    layers = sum(1 for name in modules.tensors if name.startswith("xlora_experts.") and name.endswith(".lora_A"))
    honoured["inserted"] = f"{len(paths)} LoRA experts on {layers} modules, two passes (scaling pass, main pass)"
    honoured["experts"] = {
        name: {"path": str(path), "sha256": dict(_read_expert(name, path).sha256)} for name, path in paths.items()
    }
    oracle = {**source.config, "adapters": {name: str(path) for name, path in paths.items()}}
    return Adapter(source.name, "xlora", source, (), (), (), honoured, ignored, oracle_config=oracle)


METHOD = Method("xlora", ("XLORA",), parse, fields=FIELDS, insert=insert)
