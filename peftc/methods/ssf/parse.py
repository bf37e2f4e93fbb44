"""peftc's parser for SSF adapters (``peft_type: "SSF"``; PEFT has no SSF): two formats.

**Official** (dongzelian/SSF): the fine-tuned state dict of a timm model whose modules own
``ssf_scale_N``/``ssf_shift_N`` vectors — the whole model, or only the SSF (and head) tensors. The
base model is the plain timm model; an SSF key names where it sits through its owner module and
``N``, following the official ``models/*.py`` (checked against dongzelian/SSF):

============================================  =========================  ==========================
owner (by its executed children)              ``ssf_*_1`` after          ``ssf_*_2`` after
============================================  =========================  ==========================
attention (``qkv``, ``proj``)                 ``qkv``                    ``proj``
MLP (``fc1``, ``fc2``)                        ``fc1`` (before the GELU)  ``fc2``
ViT/Swin block (``norm1``, ``norm2``)         ``norm1``                  ``norm2``
ConvNeXt block (``conv_dw``, ``norm``)        ``conv_dw``                ``norm``
Swin patch merging (``norm``, ``reduction``)  ``norm``                   —
patch embedding (``proj``, ``norm``)          ``proj`` (channel axis)    ``norm``
ConvNeXt stem / downsample (``0``, ``1``)     ``0``                      ``1``
the model itself                              final ``norm``; with none, the trunk's output
                                              (``blocks``, ``stages``, ``layers``)
============================================  =========================  ==========================

The official code applies each vector to the last axis if its size matches, else to axis 1
(``ssf_ada``); peftc picks the axis the same way on the module's output (the patch embedding's
``ssf_*_1`` is applied after flatten/transpose, i.e. on the convolution's channels, axis 1). Legacy
names of the official Swin (``layers.i.downsample`` is timm ≥ 0.9's ``layers.{i+1}.downsample``,
``head`` is ``head.fc``) and ConvNeXt (``stem.proj``/``stem.norm``, ``downsample.norm``/``.proj`` are
``.0``/``.1``) are mapped. The official ConvNeXt applies ``norm_pre`` twice when it is a real norm
(``head_norm_first``), which a plain timm model cannot reproduce: refused.

**peftc-native**: ``adapter_config.json`` with ``{"peft_type": "SSF"}`` and a safetensors file of
``<module>.ssf_scale`` / ``<module>.ssf_shift`` (``base_model.model.`` prefix optional): the vector
pair applies to the output of ``<module>``, axis chosen as above.

In both, other tensors named like base parameters are the fine-tuned model's values
(``peftc/methods/state_dict.py``). Every vector pair becomes one ``peftc::ssf`` activation site on the
module's output (``ops.py``); ``fold-ssf`` folds it away.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from peftc.errors import InputError, UnsupportedError
from peftc.ir import meta
from peftc.ir.modules import ModuleTable
from peftc.methods import common, state_dict
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.ssf.ops import SSF

FIELDS = common.Fields(
    honoured=(),
    ignored={"tuning_mode": "selects SSF in the official code", "format": "the key names say which format it is"},
)
OFFICIAL_KEY = re.compile(r"^(?:(?P<owner>.+)\.)?ssf_(?P<role>scale|shift)_(?P<index>\d+)$")
NATIVE_KEY = re.compile(r"^(?P<module>.+)\.ssf_(?P<role>scale|shift)$")

# (children the owner must execute, module after which ssf_1, ssf_2 … sit), first match wins.
PLACEMENTS: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (frozenset({"qkv", "proj"}), ("qkv", "proj")),
    (frozenset({"fc1", "fc2"}), ("fc1", "fc2")),
    (frozenset({"norm1", "norm2"}), ("norm1", "norm2")),
    (frozenset({"conv_dw"}), ("conv_dw", "norm")),
    (frozenset({"norm", "reduction"}), ("norm",)),
    (frozenset({"proj"}), ("proj", "norm")),
    (frozenset({"0", "1"}), ("0", "1")),
)
ROOT_TRUNKS = ("blocks", "stages", "layers")

# The official Swin/ConvNeXt (timm 0.5/0.6) named some modules differently from timm >= 0.9.
RENAMES: tuple[state_dict.Rename, ...] = (
    (re.compile(r"^layers\.(\d+)\.downsample\."), lambda m: f"layers.{int(m[1]) + 1}.downsample."),
    (re.compile(r"^head\.(weight|bias)$"), r"head.fc.\1"),
    (re.compile(r"^stem\.proj\."), "stem.0."),
    (re.compile(r"^stem\.norm\."), "stem.1."),
    (re.compile(r"^(stages\.\d+\.downsample)\.norm\."), r"\1.0."),
    (re.compile(r"^(stages\.\d+\.downsample)\.proj\."), r"\1.1."),
)


def implied_config(tensors: Mapping[str, object]) -> dict[str, str] | None:
    """``{"peft_type": "SSF"}`` for an official SSF checkpoint (it has ``ssf_scale_N`` keys), else None."""
    if any(OFFICIAL_KEY.match(k.removeprefix(common.PREFIX)) for k in tensors):
        return {"peft_type": "SSF"}
    return None


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an SSF adapter (official or peftc-native; see the module docstring).

    Raises:
        InputError: a vector pair with a half missing or of unequal shapes, a vector whose length
            matches no channel axis of its module's output, an SSF key whose owner matches no
            official placement, a module the base does not execute, or a tensor that is neither SSF
            nor a base parameter (or has another shape than the base's).
        UnsupportedError: a config field peftc does not know, or an official ConvNeXt with a real
            ``norm_pre``.
    """
    honoured, ignored = common.classify_fields(source, "SSF", FIELDS)
    pairs: dict[str, dict[str, AdapterTensor]] = {}
    where: dict[str, tuple[int | None, str]] = {}
    replacements, unused = [], []
    for key in source.tensors:
        path = key.removeprefix(common.PREFIX)
        official, native = OFFICIAL_KEY.match(path), NATIVE_KEY.match(path)
        if official:
            module, axis, placement = _official_placement(source, key, official, modules)
            role = official["role"]
        elif native:
            module, axis, placement, role = native["module"], None, "native", native["role"]
        else:
            replacement, why = state_dict.base_tensor(source, key, path, modules, method="SSF", renames=RENAMES)
            if replacement is not None:
                replacements.append(replacement)
            else:
                unused.append((key, why))
            continue
        if role in pairs.get(module, {}):
            other = pairs[module][role].key
            raise InputError(f"{source.describe(key)}: a second SSF {role} after {module!r} (the first is {other!r})")
        pairs.setdefault(module, {})[role] = AdapterTensor(key, source.tensors[key])
        where[module] = (axis, placement)
    sites = [_site(source, modules, module, tensors, *where[module]) for module, tensors in sorted(pairs.items())]
    if not sites:
        raise InputError(f"{source.weights_path}: no SSF tensors (ssf_scale_N/ssf_shift_N or <module>.ssf_scale)")
    return Adapter(
        name=source.name,
        method="ssf",
        source=source,
        sites=tuple(sites),
        replacements=tuple(replacements),
        unused=tuple(unused),
        honoured=honoured,
        ignored=ignored,
    )


def _site(
    source: AdapterSource,
    modules: ModuleTable,
    path: str,
    tensors: dict[str, AdapterTensor],
    axis: int | None,
    placement: str,
) -> Site:
    first = next(iter(tensors.values()))
    for role in ("scale", "shift"):
        if role not in tensors:
            raise InputError(f"{source.describe(first.key)}: SSF on {path!r} has no {role} vector")
    scale, shift = tensors["scale"], tensors["shift"]
    if scale.tensor.dim() != 1 or tuple(scale.tensor.shape) != tuple(shift.tensor.shape):
        raise InputError(
            f"{source.describe(scale.key)}: SSF scale {list(scale.tensor.shape)} and shift "
            f"{list(shift.tensor.shape)} must be vectors of one length"
        )
    module = modules.get(path)
    if module is None or not module.calls:
        raise InputError(
            f"{source.describe(scale.key)}: SSF after module {path!r}, which the base model does not execute"
            f"{common.nearest(path, modules)}"
        )
    outputs = [n for n in module.calls[0].outputs if meta.is_tensor_node(n)]
    shape = list(outputs[0].meta["val"].shape) if len(outputs) == 1 else []
    channels = scale.tensor.shape[0]
    chosen = _channel_axis(shape, channels, axis)
    if chosen is None:
        raise InputError(
            f"{source.describe(scale.key)}: SSF vector of length {channels} matches no channel axis of the output "
            f"of {path!r} ({module.class_name}, shape {shape}): the last axis, or axis 1, must have size {channels}"
        )
    info = {"module_type": module.class_name, "placement": placement, "channels": channels}
    return Site(path, SSF.name, {"ssf_scale": scale, "ssf_shift": shift}, {"axis": chosen}, info, position="output")


def _channel_axis(shape: list, channels: int, axis: int | None) -> int | None:
    """The official rule: the last axis if its size is ``channels``, else axis 1 (or the forced ``axis``)."""
    candidates = [axis] if axis is not None else [len(shape) - 1, 1]
    for candidate in candidates:
        if 0 <= candidate < len(shape) and isinstance(shape[candidate], int) and shape[candidate] == channels:
            return candidate
    return None


def _official_placement(
    source: AdapterSource, key: str, match: re.Match[str], modules: ModuleTable
) -> tuple[str, int | None, str]:
    """``(module path, forced axis or None, description)`` of an official ``ssf_*_N`` key."""
    owner, index = match["owner"] or "", int(match["index"])
    label = f"official ssf_{index} of {owner or 'the model'}"
    if owner and owner not in modules:
        renamed = state_dict.resolve_name(f"{owner}.", {f"{path}." for path in modules}, RENAMES)
        owner = renamed[:-1] if renamed else owner
    children = _children(modules, owner)
    if not owner:
        return _root_placement(source, key, index, children, modules), None, label
    if owner not in modules:
        raise InputError(
            f"{source.describe(key)}: SSF owner {owner!r} is not a module the base model executes"
            f"{common.nearest(owner, modules)}"
        )
    for required, order in PLACEMENTS:
        if required <= children:
            if index < 1 or index > len(order):
                raise InputError(
                    f"{source.describe(key)}: {modules[owner].class_name} {owner!r} has SSF placements "
                    f"{', '.join(f'ssf_{i + 1} after {n}' for i, n in enumerate(order))} in the official code, not ssf_{index}"
                )
            module = f"{owner}.{order[index - 1]}"
            forced = 1 if order == ("proj", "norm") and index == 1 and _is_conv(modules, module) else None
            return module, forced, label
    raise InputError(
        f"{source.describe(key)}: SSF on {modules[owner].class_name} {owner!r} (children {sorted(children)}) matches no "
        "placement of the official SSF code (ViT, Swin, ConvNeXt); name the module it follows with the peftc-native "
        "<module>.ssf_scale / <module>.ssf_shift keys instead"
    )


def _root_placement(source: AdapterSource, key: str, index: int, children: set[str], modules: ModuleTable) -> str:
    if index != 1:
        raise InputError(f"{source.describe(key)}: the model itself has one SSF placement (ssf_1), not ssf_{index}")
    if "norm" in children:
        return "norm"
    if "norm_pre" in children:
        raise UnsupportedError(
            f"{source.describe(key)}: the official SSF ConvNeXt applies norm_pre twice when it is a real norm "
            "(head_norm_first=True), which a plain timm model does not; only head_norm_first=False is supported"
        )
    for trunk in ROOT_TRUNKS:
        if trunk in children:
            return trunk
    raise InputError(
        f"{source.describe(key)}: the model has no final norm nor a trunk ({', '.join(ROOT_TRUNKS)}) for the "
        "official top-level SSF to follow"
    )


def _children(modules: ModuleTable, owner: str) -> set[str]:
    prefix = f"{owner}." if owner else ""
    return {
        path[len(prefix) :]
        for path, info in modules.items()
        if path.startswith(prefix) and path != owner and "." not in path[len(prefix) :] and info.calls
    }


def _is_conv(modules: ModuleTable, path: str) -> bool:
    module = modules.get(path)
    return module is not None and module.class_name.startswith("Conv")
