"""Vision models whose image size is dynamic: the ones that interpolate their position embeddings, and CNNs.

A Hugging Face vision model whose ``forward`` takes ``interpolate_pos_encoding`` (ViT, DeiT, DINOv2,
BEiT, CLIP's vision tower…) runs on other image sizes than its config's ``image_size`` when asked to.
Its artifact then takes ``pixel_values`` ``[batch, C, height, width]`` with named dims that are
multiples of the patch size (its patch convolution would silently drop the pixels past the last whole
patch), from two patches (torch.export specialises a one-patch side) to :data:`MAX_SCALE` × the
config's size, as a timm ViT does (:func:`hf_dims`), and the model is called with
``interpolate_pos_encoding=True`` by the artifact and its oracles alike. A windowed model (Swin) keeps
its size; a Hugging Face ConvNeXt takes any side from two output strides, like timm's.

Those models skip the interpolation at their own size unless ``torch.jit.is_tracing()``, a branch
torch.export would turn into a guard excluding that size; their call therefore runs as if traced, so
eager and exported code both interpolate (at the model's own size a bicubic resize to the same grid,
which leaves the embeddings as they are: verified in ``tests/test_probe_hardening3.py``).

Any other vision model keeps the recorded static size, and a call with another one is refused naming
the expected size (``peftc/feeds.py``).

timm models (:func:`timm_dims`): a ``VisionTransformer`` (ViT, DeiT…) built with ``dynamic_img_size=True``
resamples its position embeddings to the patch grid of each call (timm skips its same-size shortcut while
exporting, so the exported graph interpolates at every size, and a bicubic resize to the same grid is the
identity). Its ``height``/``width`` are multiples of the patch size (timm asserts it) from two patches to
:data:`MAX_SCALE` × its ``img_size``. The ``timm:`` loader builds a ViT with ``dynamic_img_size=True``
unless the spec says ``dynamic_img_size=false`` (the weights are the same). A ResNet or ConvNeXt has no
position embeddings: any side from two output strides (two cells of the last feature map; torch.export
specialises a one-cell map) to :data:`MAX_SCALE` × its default input size. Every other timm model keeps
its size, and the manifest's ``model.image_size`` says why.
"""

from __future__ import annotations

import inspect
import types
from typing import Any
from unittest import mock

import torch

MAX_SCALE = 4
"""The largest image side an artifact takes, as a multiple of the model's own (attention cost grows with
the fourth power of the side)."""
FLAG = "interpolate_pos_encoding"
CNN_CLASSES = ("ResNet", "ConvNeXt")
"""timm CNN classes whose image size is dynamic (verified against eager PyTorch at odd sizes)."""
HF_CNN_TYPES = ("convnext", "convnextv2")
"""Hugging Face CNN ``model_type``s whose image size is dynamic (a ``patch_size`` stem, then
``num_stages`` stages, each after the first halving the map)."""


def interpolates(model: Any) -> int | None:
    """The patch size of a Hugging Face vision model that can interpolate its position embeddings, else None.

    A windowed model (Swin's family: a config with ``window_size``) takes the flag too, but pads its
    feature maps to whole windows, which torch.export cannot trace at symbolic sizes: it keeps its size.
    """
    config = _vision_config(model)
    patch = getattr(config, "patch_size", None)
    try:
        takes = FLAG in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    plain = getattr(config, "window_size", None) is None
    return patch if takes and plain and isinstance(patch, int) and patch > 0 else None


def _vision_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) or config


def hf_dims(model: Any, height: int, width: int) -> tuple[dict[str, tuple[int, int, int]], str]:
    """``({dim: (min, max, multiple)}, note)`` of a Hugging Face vision model's ``height``/``width``, as
    :func:`timm_dims` does for timm: a ViT that interpolates its position embeddings takes multiples of its
    patch size from two patches to :data:`MAX_SCALE` × its ``image_size`` (its convolution would drop the
    pixels past the last whole patch); a ConvNeXt (no position embeddings) any side from two output strides;
    every other model keeps its size, and the note says why."""
    patch = interpolates(model)
    config = _vision_config(model)
    if patch is not None:
        dims = {d: (2 * patch, max(2 * patch, MAX_SCALE * s // patch * patch), patch) for d, s in _sides(height, width)}
        return dims, f"dynamic: multiples of the patch size {patch}, position embeddings interpolated ({FLAG})"
    stem, stages = getattr(config, "patch_size", None), getattr(config, "num_stages", None)
    if getattr(config, "model_type", None) in HF_CNN_TYPES and isinstance(stem, int) and isinstance(stages, int):
        stride = stem * 2 ** (stages - 1)
        dims = {d: (2 * stride, max(2 * stride, MAX_SCALE * s), 1) for d, s in _sides(height, width)}
        return dims, f"dynamic: a CNN, from two output strides ({2 * stride})"
    if getattr(config, "window_size", None) is not None:
        return {}, f"fixed {height}x{width}: {type(model).__name__} attends within windows (window_size)"
    return {}, f"fixed {height}x{width}: {type(model).__name__}.forward takes no {FLAG}"


def attach(module: torch.nn.Module) -> None:
    """Make ``module``'s calls interpolate its position embeddings at any size (see the module docstring).

    The forward is bound to the module (``types.MethodType``), so a deep copy (PEFT's oracle) calls its own.
    """

    def interpolating(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault(FLAG, True)
        with mock.patch.object(torch.jit, "is_tracing", lambda: True):
            return type(self).forward(self, *args, **kwargs)

    interpolating.__signature__ = inspect.signature(type(module).forward)  # type: ignore[attr-defined]
    module.forward = types.MethodType(interpolating, module)


def timm_dims(model: Any, height: int, width: int) -> tuple[dict[str, tuple[int, int, int]], str]:
    """``({dim: (min, max, multiple)}, note)`` of a timm model's ``height``/``width``: empty where the size
    stays ``height`` × ``width``; the note says which case applies and why (the manifest's ``image_size``)."""
    name = type(model).__name__
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) and len(set(patch)) == 1 else patch
    if is_timm_vit(model) and isinstance(patch, int):
        if not getattr(model, "dynamic_img_size", False):
            return {}, f"fixed {height}x{width}: {name} built with dynamic_img_size=False"
        dims = {d: (2 * patch, max(2 * patch, MAX_SCALE * s // patch * patch), patch) for d, s in _sides(height, width)}
        return dims, f"dynamic: multiples of the patch size {patch}, position embeddings resampled"
    if name in CNN_CLASSES and getattr(model, "feature_info", None):
        stride = int(model.feature_info[-1]["reduction"])
        dims = {d: (2 * stride, max(2 * stride, MAX_SCALE * s), 1) for d, s in _sides(height, width)}
        return dims, f"dynamic: a CNN, from two output strides ({2 * stride})"
    return {}, f"fixed {height}x{width}: peftc takes other sizes of timm's VisionTransformer, ResNet and ConvNeXt only"


def _sides(height: int, width: int) -> list[tuple[str, int]]:
    return [("height", height), ("width", width)]


def is_timm_vit(model: Any) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (ViT, DeiT...; timm is imported by then) embedding
    plain patches (a hybrid's CNN stem has another stride than its ``patch_size``)."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer) and type(getattr(model, "patch_embed", None)) is PatchEmbed


def hf_note(model: Any, signature: Any) -> str:
    """The image-size note of a Hugging Face vision model (:func:`hf_dims`'s, for the signature's size)."""
    shape = signature.inputs[0].shape[2:]
    if "height" in signature.dims:
        return hf_dims(model, 1, 1)[1]
    fixed = len(shape) == 2 and all(isinstance(d, int) for d in shape)
    return hf_dims(model, *shape)[1] if fixed else f"fixed {shape}"
