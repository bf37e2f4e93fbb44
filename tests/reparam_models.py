"""Tiny seeded models, reference eager SSF and ZeroI2V implementations, and their checkpoints.

PEFT implements neither SSF nor ZeroI2V, so the oracles are written here, from the official code
(dongzelian/SSF ``models/*.py``; leexinhao/ZeroI2V ``vit_zero_clip.py`` and ``common/stdha.py``), and
share nothing with peftc's parsers, ops or passes:

* :func:`ssf_reference` wraps the modules of a timm model after which the official code applies
  ``ssf_ada`` (its own table, :data:`SSF_PLACES`, per family), with the official rule for the axis;
* :func:`zeroi2v_reference` wraps a video ViT's attention and MLP with the official ``LinearAdapter``
  arrangement and shifts keys and values after ``qkv`` with the official ``TemporalShift`` code
  (clone, then slice assignment), in its ``(tokens, batch·frames, channels)`` layout.

Checkpoints are written in the official key naming (``ssf_scale_N``; ``backbone.transformer.resblocks.N.
T_Adapter_in.D_fc1.weight``) and in peftc's native formats. Every trained tensor is drawn so the adapter
changes the outputs by several percent.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import models
import torch
from safetensors.torch import save_file
from torch import nn

FRAMES = 3
VIDEO_INPUTS = [f"x:batch,{FRAMES},3,32,32:float32"]
IMAGE_INPUTS = ["x:batch,3,32,32:float32"]


def seeded(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------
# models


VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4, "num_classes": 5}
SWIN_ARGS = {
    "img_size": 32,
    "embed_dim": 16,
    "depths": [2, 2],
    "num_heads": [2, 4],
    "window_size": 4,
    "num_classes": 5,
}
CONVNEXT_ARGS = {"dims": [12, 16, 24, 40], "depths": [1, 1, 1, 1], "num_classes": 5, "conv_mlp": False}
TIMM = {
    "vit": ("vit_tiny_patch16_224", VIT_ARGS),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_ARGS),
    "convnext": ("convnext_atto", CONVNEXT_ARGS),
}


def timm_model(family: str, seed: int = 0) -> nn.Module:
    timm = models.import_timm()
    name, kwargs = TIMM[family]
    return seeded(lambda: timm.create_model(name, pretrained=False, **kwargs), seed)


def timm_spec(family: str, weights: Path) -> str:
    """The ``timm:`` model spec of :func:`timm_model` with its weights saved at ``weights``."""
    name, kwargs = TIMM[family]
    args = ",".join(f"{k}={json.dumps(v).replace(' ', '')}" for k, v in kwargs.items())
    return f"timm:{name},{args}@{weights}"


def save_weights(model: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class ResNetish(nn.Module):
    """A ResNet-style conv net: conv-BN-ReLU stem, a residual basic block, a 1×1 projection with
    GroupNorm, a norm without affine, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.proj = nn.Conv2d(8, 12, 1)
        self.gn = nn.GroupNorm(3, 12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(12, elementwise_affine=False)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.stem(x)))
        h = self.act2(h + self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        h = torch.relu(self.gn(self.proj(h)))
        return self.head(self.norm(self.pool(h).flatten(1)))


def resnetish(seed: int = 0) -> nn.Module:
    model = seeded(ResNetish, seed)
    with torch.no_grad():  # non-trivial running statistics
        for bn in (model.bn, model.bn1):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return model


RESNET_INPUTS = ["x:batch,3,6,6:float32"]  # 6×6: no spatial size equals a channel count
# native SSF sites of the conv net: producers (conv, BatchNorm, GroupNorm), consumers (the 1×1 conv
# after the block, the head after the affine-less norm), and one that cannot fold: the stem's ReLU
# output feeds both the padded conv1 and the residual sum.
RESNET_SSF = {"stem": 8, "bn": 8, "bn1": 8, "act2": 8, "gn": 12, "norm": 12}
RESNET_KEPT = {"act": 8}


class VideoViT(nn.Module):
    """A timm ViT applied to every frame of a clip ``[B, T, 3, H, W]`` (frames folded into the batch,
    time innermost), class tokens averaged over time, then the head."""

    def __init__(self, vit: nn.Module, frames: int) -> None:
        super().__init__()
        self.vit = vit
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        tokens = self.vit.forward_features(x.flatten(0, 1))
        pooled = tokens[:, 0].reshape(batch, self.frames, -1).mean(1)
        return self.vit.forward_head(pooled.unsqueeze(1), pre_logits=False)


def video_vit(frames: int = FRAMES, seed: int = 0) -> nn.Module:
    timm = models.import_timm()
    kwargs = dict(VIT_ARGS, global_pool="token")
    return seeded(lambda: VideoViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), frames), seed)


# ------------------------------------------------------------------------------------------------
# SSF: the official placements (modern timm module paths) and the reference


def ssf_ada(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The official ``ssf_ada``: the last axis if it has the vector's length, else axis 1."""
    if x.shape[-1] == scale.shape[0]:
        return x * scale + shift
    if x.shape[1] == scale.shape[0]:
        return x * scale.view(1, -1, *([1] * (x.dim() - 2))) + shift.view(1, -1, *([1] * (x.dim() - 2)))
    raise ValueError("the input tensor shape does not match the shape of the scale factor.")


class SSFAfter(nn.Module):
    """``ssf_ada`` after ``inner``; ``tokens`` applies it where the official patch embedding does,
    after ``flatten(2).transpose(1, 2)``."""

    def __init__(self, inner: nn.Module, scale: torch.Tensor, shift: torch.Tensor, tokens: bool = False) -> None:
        super().__init__()
        self.inner, self.scale, self.shift, self.tokens = inner, scale, shift, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if not self.tokens:
            return ssf_ada(y, self.scale, self.shift)
        seq = ssf_ada(y.flatten(2).transpose(1, 2), self.scale, self.shift)
        return seq.transpose(1, 2).reshape(y.shape)


def ssf_places(model: nn.Module, family: str) -> dict[str, tuple[str, bool]]:
    """Official key prefix (``<owner>.ssf_{scale,shift}_N`` without the role) → (module to wrap, tokens)."""
    names = {n for n, _ in model.named_modules()}
    places: dict[str, tuple[str, bool]] = {}
    if family in ("vit", "swin"):
        places["patch_embed.ssf_{}_1"] = ("patch_embed.proj", True)
        if family == "swin":
            places["patch_embed.ssf_{}_2"] = ("patch_embed.norm", False)
        places["ssf_{}_1"] = ("norm", False)
    for name in sorted(names):
        if re.fullmatch(r"(blocks|layers\.\d+\.blocks)\.\d+", name):
            if family == "convnext":
                continue
            for i, child in enumerate(("norm1", "norm2"), 1):
                places[f"{name}.ssf_{{}}_{i}"] = (f"{name}.{child}", False)
            for i, child in enumerate(("qkv", "proj"), 1):
                places[f"{name}.attn.ssf_{{}}_{i}"] = (f"{name}.attn.{child}", False)
            for i, child in enumerate(("fc1", "fc2"), 1):
                places[f"{name}.mlp.ssf_{{}}_{i}"] = (f"{name}.mlp.{child}", False)
        stage = re.fullmatch(r"layers\.(\d+)\.downsample", name)
        if family == "swin" and stage and f"{name}.norm" in names:
            # the official Swin merges patches at the end of stage i, timm >= 0.9 at the start of i + 1
            places[f"layers.{int(stage[1]) - 1}.downsample.ssf_{{}}_1"] = (f"{name}.norm", False)
        if family == "convnext":
            if re.fullmatch(r"stages\.\d+\.blocks\.\d+", name):
                for i, child in enumerate(("conv_dw", "norm"), 1):
                    places[f"{name}.ssf_{{}}_{i}"] = (f"{name}.{child}", False)
                for i, child in enumerate(("fc1", "fc2"), 1):
                    places[f"{name}.mlp.ssf_{{}}_{i}"] = (f"{name}.mlp.{child}", False)
            if re.fullmatch(r"stages\.\d+\.downsample|stem", name) and f"{name}.0" in names:
                for i in (1, 2):
                    places[f"{name}.ssf_{{}}_{i}"] = (f"{name}.{i - 1}", False)
    if family == "convnext":
        places["ssf_{}_1"] = ("norm_pre", False)  # Identity in timm's default ConvNeXt
    return places


def _channels(model: nn.Module, path: str) -> int:
    module = model.get_submodule(path)
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    return int(model.num_features)  # norm_pre: an Identity before the head


def ssf_tensors(model: nn.Module, family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Official-format SSF vectors for every placement: γ ~ 1 + 0.2·N(0, 1), β ~ 0.1·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (path, _) in ssf_places(model, family).items():
        c = _channels(model, path)
        tensors[key.format("scale")] = 1 + 0.2 * torch.randn(c, generator=g)
        tensors[key.format("shift")] = 0.1 * torch.randn(c, generator=g)
    return tensors


def ssf_reference(model: nn.Module, family: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with the official SSF applied at every place ``tensors`` has vectors for."""
    reference = copy.deepcopy(model)
    for key, (path, tokens) in ssf_places(model, family).items():
        if key.format("scale") in tensors:
            parent, _, child = path.rpartition(".")
            owner = reference.get_submodule(parent) if parent else reference
            inner = getattr(owner, child)
            setattr(owner, child, SSFAfter(inner, tensors[key.format("scale")], tensors[key.format("shift")], tokens))
    return reference


def native_ssf(model: nn.Module, places: dict[str, int], seed: int = 1) -> dict[str, torch.Tensor]:
    """peftc-native SSF vectors ``<module>.ssf_scale``/``.ssf_shift`` after each module of ``places``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, c in places.items():
        tensors[f"{path}.ssf_scale"] = 1 + 0.2 * torch.randn(c, generator=g)
        tensors[f"{path}.ssf_shift"] = 0.1 * torch.randn(c, generator=g)
    return tensors


def native_ssf_reference(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    reference = copy.deepcopy(model)
    for key in tensors:
        if key.endswith(".ssf_scale"):
            path = key.removesuffix(".ssf_scale")
            parent, _, child = path.rpartition(".")
            owner = reference.get_submodule(parent) if parent else reference
            setattr(owner, child, SSFAfter(getattr(owner, child), tensors[key], tensors[f"{path}.ssf_shift"]))
    return reference


def write_native(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


# ------------------------------------------------------------------------------------------------
# ZeroI2V: the official LinearAdapter and TemporalShift, and the reference


class LinearAdapter(nn.Module):
    """The official adapter: ``x + s·D_fc2(D_fc1(x))`` (dropout is the identity in eval)."""

    def __init__(self, width: int, hidden: int, scale: float) -> None:
        super().__init__()
        self.D_fc1 = nn.Linear(width, hidden)
        self.D_fc2 = nn.Linear(hidden, width)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.D_fc2(self.D_fc1(x)) * self.scale


def official_temporal_shift(x: torch.Tensor, frames: int, fold_div: int, stride: int = 1, long_div: int = -1):
    """``TemporalShift.forward`` (divide_head=False) on ``x`` of shape ``(n, b·t, c)``."""
    n, bt, c = x.shape
    feat = x.view(n, bt // frames, frames, c)
    out = feat.clone()
    fold = int(c // fold_div)
    out[:, :, stride:, :fold] = feat[:, :, : -1 * stride, :fold]
    out[:, :, : -1 * stride, fold : 2 * fold] = feat[:, :, stride:, fold : 2 * fold]
    if long_div > 0:
        long_fold = c // long_div
        out[:, :, 2:, 2 * fold : (2 * fold + long_fold)] = feat[:, :, :-2, 2 * fold : (2 * fold + long_fold)]
    return out.view(n, bt, c)


class ShiftedQKV(nn.Module):
    """timm's ``qkv`` followed by STDHA's shift of keys and values (in the official layout)."""

    def __init__(self, qkv: nn.Linear, frames: int, stdha: dict) -> None:
        super().__init__()
        self.qkv, self.frames, self.stdha = qkv, frames, stdha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [(b t), n, c] each

        def shift(t: torch.Tensor) -> torch.Tensor:
            return official_temporal_shift(
                t.transpose(0, 1),
                self.frames,
                self.stdha.get("shift_div", 12),
                self.stdha.get("shift_stride", 1),
                self.stdha.get("long_shift_div", -1),
            ).transpose(0, 1)

        return torch.cat([q, shift(k), shift(v)], dim=-1)


class Around(nn.Module):
    """``after(inner(before(x)))``: the official block's ``S(attention(T(x)))`` and ``O(mlp(M(x)))``."""

    def __init__(self, inner: nn.Module, before: nn.Module | None, after: nn.Module | None) -> None:
        super().__init__()
        self.inner, self.before, self.after = inner, before, after

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        x = self.before(x) if self.before is not None else x
        x = self.inner(x, **kwargs)
        return self.after(x) if self.after is not None else x


PLACEMENT_NAMES = ("T_Adapter_in", "S_Adapter", "MLP_Adapter", "MLP_Adapter_out")


def zeroi2v_adapters(model: VideoViT, hidden: int = 8, seed: int = 1) -> dict[int, dict[str, LinearAdapter]]:
    """Seeded official adapters for every block (D_fc2 is drawn too: zero-init would be vacuous)."""
    torch.manual_seed(seed)
    width = model.vit.embed_dim
    adapters = {}
    for index in range(len(model.vit.blocks)):
        adapters[index] = {}
        for name in PLACEMENT_NAMES:
            adapter = LinearAdapter(width, hidden, scale=0.5).eval()
            with torch.no_grad():
                adapter.D_fc2.weight.normal_(0, 0.3)
                adapter.D_fc2.bias.normal_(0, 0.1)
            adapters[index][name] = adapter
    return adapters


def zeroi2v_reference(model: VideoViT, adapters: dict, stdha: dict | None, frames: int = FRAMES) -> nn.Module:
    """The video ViT with ZeroI2V's block arrangement and STDHA, as the official code computes it."""
    reference = copy.deepcopy(model)
    for index, block in enumerate(reference.vit.blocks):
        chosen = adapters.get(index, {})
        if stdha is not None:
            block.attn.qkv = ShiftedQKV(block.attn.qkv, frames, stdha)
        block.attn = Around(block.attn, chosen.get("T_Adapter_in"), chosen.get("S_Adapter"))
        block.mlp = Around(block.mlp, chosen.get("MLP_Adapter"), chosen.get("MLP_Adapter_out"))
    return reference


def zeroi2v_official_tensors(adapters: dict) -> dict[str, torch.Tensor]:
    """The official checkpoint naming, on the CLIP block paths the official backbone has."""
    tensors = {}
    for index, chosen in adapters.items():
        for name, adapter in chosen.items():
            for key, value in adapter.state_dict().items():
                tensors[f"backbone.transformer.resblocks.{index}.{name}.{key}"] = value.clone()
    return tensors


NATIVE_MODULES = {
    "T_Adapter_in": ("attn.qkv", "in"),
    "S_Adapter": ("attn.proj", "out"),
    "MLP_Adapter": ("mlp.fc1", "in"),
    "MLP_Adapter_out": ("mlp.fc2", "out"),
}


def zeroi2v_native_tensors(adapters: dict) -> dict[str, torch.Tensor]:
    """peftc's native naming: ``<projection>.zeroi2v_{in,out}.{down,up}.{weight,bias}``."""
    tensors = {}
    for index, chosen in adapters.items():
        for name, adapter in chosen.items():
            module, side = NATIVE_MODULES[name]
            for layer, fc in (("down", adapter.D_fc1), ("up", adapter.D_fc2)):
                for param in ("weight", "bias"):
                    key = f"vit.blocks.{index}.{module}.zeroi2v_{side}.{layer}.{param}"
                    tensors[key] = getattr(fc, param).detach().clone()
    return tensors


@functools.cache
def exported(kind: str, frames: int = FRAMES) -> tuple[nn.Module, object]:
    """``(model, program)`` for a kind of test model, traced once per session as ``peftc.compile`` does
    (programs are never mutated: passes build new ones)."""
    from conftest import export

    from peftc.loaders import parse_inputs

    if kind == "video":
        model, inputs = video_vit(frames), [f"x:batch,{frames},3,32,32:float32"]
    elif kind == "resnet":
        model, inputs = resnetish(), RESNET_INPUTS
    else:
        model, inputs = timm_model(kind), IMAGE_INPUTS
    return model, export(model, parse_inputs(inputs))


def video(batch: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
