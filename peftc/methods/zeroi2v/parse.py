"""peftc's parser for ZeroI2V adapters (``peft_type: "ZEROI2V"``; PEFT has no ZeroI2V).

ZeroI2V (leexinhao/ZeroI2V) adapts an image transformer to video with linear adapters (down/up
Linears, no non-linearity; ``ops.py``) at four placements of each block, and STDHA, a
temporal shift of some key/value channels. The adapter config carries what the checkpoint does not:

* ``scale`` (required): the script-level adapter scale ``s`` (``adapter_scale``; 0.5 in the released
  configs and ``tools/weight_reparam.py``);
* ``skip_connect`` (default true): the adapter's residual ``x +``;
* ``num_frames``: frames per clip (required with STDHA);
* ``stdha``: absent/null for no STDHA, else ``{"shift_div": 12, "shift_stride": 1, "long_shift_div": -1}``
  as ``TemporalShift`` takes them (``divide_head`` and ``shift_pattern: "qkv"`` raise
  ``NotImplementedError`` in the official code and are refused), plus optional ``target_modules``
  (attention in-projections, a list or a regex; default every block's ``attn.qkv``).

Tensor keys, in either of two formats:

* **official** ``[backbone.]<block>.<placement>.D_fc{1,2}.{weight,bias}``, ``<placement>`` one of
  ``T_Adapter_in`` (before the attention in-projection: timm ``attn.qkv`` or the
  ``nn.MultiheadAttention`` ``attn``), ``S_Adapter`` (after the out-projection ``attn.proj``, or the
  output of an ``nn.MultiheadAttention``, which ends with its out-projection), ``MLP_Adapter`` (before
  ``mlp.fc1`` / ``mlp.c_fc``) and ``MLP_Adapter_out``
  (after ``mlp.fc2`` / ``mlp.c_proj``). The official CLIP block path ``transformer.resblocks.N`` is read
  as the base's ``blocks.N`` when the base is a timm ViT (e.g. timm's port of CLIP);
* **peftc-native** ``<module>.zeroi2v_{in,out}.{down,up}.{weight,bias}``: an adapter before (``in``) or
  after (``out``) the Linear ``<module>``.

Tensors named like base parameters are the fine-tuned values (``peftc/methods/state_dict.py``).
Each adapter is a ``peftc::linear_adapter`` activation site on the projection's input or output, and
STDHA a ``peftc::temporal_shift`` site on each in-projection's output: with ``C`` the embedding width
and ``f = C // shift_div``, key channels ``[C, C+f)`` move +``shift_stride`` frames and ``[C+f, C+2f)``
−``shift_stride`` (values likewise at ``2C``), plus ``C // long_shift_div`` channels +2 frames when
``long_shift_div > 0``, exactly as ``TemporalShift`` does on the keys and values.
"""

from __future__ import annotations

import re
from typing import Any

import sympy
import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir import meta
from peftc.ir.modules import ModuleInfo, ModuleTable
from peftc.methods import common, state_dict
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.zeroi2v.ops import LINEAR_ADAPTER, TEMPORAL_SHIFT

FIELDS = common.Fields(
    honoured=("scale", "skip_connect", "num_frames", "stdha"),
    ignored={
        "dropout_rate": "dropout is the identity at inference",
        "mlp_ratio": "the hidden width is read from the tensors",
        "adapter_type": "only linear adapters exist (checked)",
        "format": "the key names say which format it is",
    },
    defaults={"skip_connect": True},
)
STDHA_FIELDS = {"shift_div", "shift_stride", "long_shift_div", "divide_head", "shift_pattern", "target_modules"}

OFFICIAL_KEY = re.compile(r"^(?P<block>.+)\.(?P<placement>[^.]+)\.D_fc(?P<layer>[12])\.(?P<param>weight|bias)$")
NATIVE_KEY = re.compile(r"^(?P<module>.+)\.zeroi2v_(?P<side>[^.]+)\.(?P<layer>down|up)\.(?P<param>weight|bias)$")
CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)$")

# placement → (side, projections it may sit next to, relative to the block)
PLACEMENTS = {
    "T_Adapter_in": ("input", ("attn.qkv", "attn")),
    "S_Adapter": ("output", ("attn.proj", "attn.out_proj", "attn")),
    "MLP_Adapter": ("input", ("mlp.fc1", "mlp.c_fc")),
    "MLP_Adapter_out": ("output", ("mlp.fc2", "mlp.c_proj")),
}
SIDES = {"in": "input", "out": "output"}
ROLES = {("1", "weight"): "down_weight", ("1", "bias"): "down_bias", ("2", "weight"): "up_weight"}
ROLES |= {("2", "bias"): "up_bias", ("down", "weight"): "down_weight", ("down", "bias"): "down_bias"}
ROLES |= {("up", "weight"): "up_weight", ("up", "bias"): "up_bias"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a ZeroI2V adapter (official or peftc-native; see the module docstring).

    Raises:
        InputError: an adapter at an unknown placement, a block or projection the base lacks, a
            tensor whose shape does not fit its projection, a missing ``scale``, STDHA without
            ``num_frames`` or on a model whose in-projection has no time axis (frames folded into
            the batch axis), or a tensor that is neither ZeroI2V nor a base parameter.
        UnsupportedError: a config field peftc does not know, ``adapter_type`` other than linear,
            STDHA variants the official code does not implement.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "ZEROI2V", FIELDS)
    common.check_number(source, "scale", "num_frames")
    if cfg.get("adapter_type") not in (None, "linear"):
        raise UnsupportedError(
            f"{source.config_path}: adapter_type={cfg['adapter_type']!r}; ZeroI2V adapters are linear"
        )
    adapters: dict[tuple[str, str], dict[str, AdapterTensor]] = {}
    labels: dict[tuple[str, str], str] = {}
    replacements, unused = [], []
    for key in source.tensors:
        path = key.removeprefix(common.PREFIX).removeprefix("backbone.")
        official, native = OFFICIAL_KEY.match(path), NATIVE_KEY.match(path)
        if official:
            module, side, label = _official(source, key, official, modules)
            role = ROLES[official["layer"], official["param"]]
        elif native:
            if native["side"] not in SIDES:
                raise InputError(
                    f"{source.describe(key)}: unknown ZeroI2V placement zeroi2v_{native['side']} "
                    "(zeroi2v_in: before the Linear, zeroi2v_out: after it)"
                )
            module, side, label = native["module"], SIDES[native["side"]], "native"
            role = ROLES[native["layer"], native["param"]]
        else:
            replacement, why = state_dict.base_tensor(source, key, path, modules, method="ZeroI2V")
            if replacement is not None:
                replacements.append(replacement)
            else:
                unused.append((key, why))
            continue
        adapters.setdefault((module, side), {})[role] = AdapterTensor(key, source.tensors[key])
        labels[module, side] = label
    if not adapters and not cfg.get("stdha"):
        raise InputError(f"{source.weights_path}: no ZeroI2V adapter tensors and no stdha in the config")
    if adapters and cfg.get("scale") is None:
        raise InputError(
            f"{source.config_path}: no 'scale': the script-level adapter scale is part of a ZeroI2V adapter "
            "(adapter_scale, 0.5 in the released configs)"
        )
    sites = [
        _adapter_site(source, modules, module, side, tensors, labels[module, side], honoured)
        for (module, side), tensors in sorted(adapters.items())
    ]
    sites += _stdha_sites(source, modules, cfg)
    return Adapter(
        name=source.name,
        method="zeroi2v",
        source=source,
        sites=tuple(sites),
        replacements=tuple(replacements),
        unused=tuple(unused),
        honoured=honoured,
        ignored=ignored,
    )


def _official(source: AdapterSource, key: str, match: re.Match[str], modules: ModuleTable) -> tuple[str, str, str]:
    placement, block = match["placement"], match["block"]
    if placement not in PLACEMENTS:
        raise InputError(
            f"{source.describe(key)}: unknown ZeroI2V placement {placement!r}; the official code has "
            f"{', '.join(PLACEMENTS)}"
        )
    block = _block(source, key, block, modules)
    side, candidates = PLACEMENTS[placement]
    for relative in candidates:
        module = modules.get(f"{block}.{relative}")
        if module is not None and module.calls and _is_projection(module, relative):
            return module.path, side, f"{placement} of {block}"
    raise InputError(
        f"{source.describe(key)}: {placement} sits next to {' or '.join(f'{block}.{c}' for c in candidates)}, "
        "which the base model does not execute"
    )


def _block(source: AdapterSource, key: str, block: str, modules: ModuleTable) -> str:
    if block in modules:
        return block
    clip = CLIP_BLOCK.match(block)
    if clip:
        found = [p for p in modules if p == f"blocks.{clip[1]}" or p.endswith(f".blocks.{clip[1]}")]
        if len(found) == 1:
            return found[0]
    raise InputError(
        f"{source.describe(key)}: block {block!r} is not a module of the base model{common.nearest(block, modules)}"
    )


def _is_projection(module: ModuleInfo, relative: str) -> bool:
    if relative == "attn":  # nn.MultiheadAttention: the in-projection is its in_proj_weight
        return "in_proj_weight" in module.params
    return module.class_name in ("Linear", "NonDynamicallyQuantizableLinear")


def _adapter_site(
    source: AdapterSource,
    modules: ModuleTable,
    path: str,
    side: str,
    tensors: dict[str, AdapterTensor],
    label: str,
    honoured: dict[str, Any],
) -> Site:
    first = next(iter(tensors.values()))
    module = modules.get(path)
    if module is None or not module.calls:
        raise InputError(
            f"{source.describe(first.key)}: module {path!r} is not executed by the base model{common.nearest(path, modules)}"
        )
    weight_name = module.params.get("weight") or module.params.get("in_proj_weight")
    if weight_name is None or not _is_projection(module, "attn" if "in_proj_weight" in module.params else ""):
        raise InputError(
            f"{source.describe(first.key)}: unknown ZeroI2V placement: {module.class_name} {path!r} is not a linear "
            "projection (a ZeroI2V adapter sits before or after a Linear)"
        )
    common.require_roles(source, f"{path} ({label})", tensors, ["down_weight", "up_weight"])
    d_out, d_in = modules.state_shapes[weight_name][:2]
    # nn.MultiheadAttention takes and returns its embedding width (in_proj_weight is [3·d, d])
    width = d_in if side == "input" or "in_proj_weight" in module.params else d_out
    hidden = tensors["down_weight"].tensor.shape[0]
    expected = {"down_weight": (hidden, width), "down_bias": (hidden,), "up_weight": (width, hidden)}
    expected["up_bias"] = (width,)
    for role, tensor in tensors.items():
        what = f"{list(expected[role])} for a {label} adapter of width {width} (hidden {hidden}) {side} {path!r}"
        common.expect_shape(source, tensor, expected[role], what)
    scalars = {"scale": float(honoured["scale"]), "residual": bool(honoured["skip_connect"])}
    info = {"placement": label, "side": side, "hidden": hidden, "module_type": module.class_name}
    site_tensors = {role: tensors.get(role) for role in LINEAR_ADAPTER.tensor_roles}
    return Site(path, LINEAR_ADAPTER.name, site_tensors, scalars, info, position=side)


def _stdha_sites(source: AdapterSource, modules: ModuleTable, cfg: dict[str, Any]) -> list[Site]:
    stdha = cfg.get("stdha")
    if not stdha:
        return []
    where = source.config_path
    if not isinstance(stdha, dict) or set(stdha) - STDHA_FIELDS:
        unknown = sorted(set(stdha) - STDHA_FIELDS) if isinstance(stdha, dict) else stdha
        raise UnsupportedError(f"{where}: stdha fields peftc does not know: {unknown}")
    if stdha.get("divide_head") or stdha.get("shift_pattern", "kv") != "kv":
        raise UnsupportedError(
            f"{where}: stdha divide_head/shift_pattern='qkv' raise NotImplementedError in the official code; "
            "only the key/value shift across all heads' channels (divide_head=false, shift_pattern='kv') exists"
        )
    frames = cfg.get("num_frames")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise InputError(f"{where}: STDHA needs num_frames (frames per clip, a positive integer), got {frames!r}")
    shift_div, stride = stdha.get("shift_div", 12), stdha.get("shift_stride", 1)
    long_div = stdha.get("long_shift_div", -1)
    targets = _stdha_targets(source, modules, stdha.get("target_modules"))
    sites = []
    for module in targets:
        node = _single_output(module)
        width = node.meta["val"].shape[-1]
        if width % 3:
            raise InputError(f"{where}: STDHA on {module.path!r}, whose output width {width} is not q, k, v stacked")
        channels = width // 3
        fold = int(channels // shift_div)
        long_fold = channels // long_div if long_div > 0 else 0
        if fold < 1 or 2 * fold + long_fold > channels:
            raise InputError(
                f"{where}: stdha shift_div={shift_div}, long_shift_div={long_div} do not fit {channels} key channels "
                f"of {module.path!r} (2·{channels}//shift_div + long channels must be between 2 and {channels})"
            )
        _check_time_axis(source, module, node, frames)
        spans: list[int] = []
        for base in (channels, 2 * channels):  # keys, then values
            spans += [base, base + fold, stride, base + fold, base + 2 * fold, -stride]
            if long_fold:
                spans += [base + 2 * fold, base + 2 * fold + long_fold, 2]
        scalars = {"frames": frames, "batch_axis": 0, "spans": spans}
        info = {"module_type": module.class_name, "stdha_channels": fold, "placement": "STDHA"}
        sites.append(Site(module.path, TEMPORAL_SHIFT.name, {}, scalars, info, position="output"))
    return sites


def _stdha_targets(source: AdapterSource, modules: ModuleTable, wanted: Any) -> list[ModuleInfo]:
    if wanted is None:
        found = [m for p, m in modules.items() if p.endswith("attn.qkv") and m.calls]
        if not found:
            mha = [p for p, m in modules.items() if "in_proj_weight" in m.params]
            why = (
                f": {mha[0]!r} is an nn.MultiheadAttention, which computes its in-projection inside; STDHA needs it "
                "as its own Linear (timm's attn.qkv)"
                if mha
                else ""
            )
            raise UnsupportedError(f"{source.config_path}: STDHA found no attention in-projection (attn.qkv){why}")
        return found
    paths = [p for p in modules if re.fullmatch(wanted, p)] if isinstance(wanted, str) else [str(p) for p in wanted]
    for path in paths:
        module = modules.get(path)
        if module is None or not module.calls or module.class_name != "Linear":
            raise InputError(
                f"{source.config_path}: stdha target {path!r} is not a Linear the base model executes"
                f"{common.nearest(path, modules)}"
            )
    if not paths:
        raise InputError(f"{source.config_path}: stdha target_modules={wanted!r} matches no module")
    return [modules[p] for p in paths]


def _single_output(module: ModuleInfo) -> Any:
    outputs = [n for n in module.calls[0].outputs if meta.is_tensor_node(n)]
    if len(outputs) != 1:
        raise UnsupportedError(f"STDHA on {module.path!r}: its call has {len(outputs)} tensor outputs, not one")
    return outputs[0]


def _check_time_axis(source: AdapterSource, module: ModuleInfo, node: Any, frames: int) -> None:
    """The in-projection's axis 0 must hold batch × ``frames`` (frames folded into the batch)."""
    size = node.meta["val"].shape[0]
    expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
    if frames == 1 or sympy.Mod(expr, frames) == 0:
        return
    raise InputError(
        f"{source.config_path}: STDHA needs a time axis: frames folded into the batch axis, (batch·{frames}) frames "
        f"first; the output of {module.path!r} is {list(node.meta['val'].shape)}, whose axis 0 ({size}) is not a "
        f"multiple of num_frames={frames}. Is the base a video model taking {frames} frames per clip?"
    )
