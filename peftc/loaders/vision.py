"""Vision models whose image size is dynamic: the ones that interpolate their position embeddings.

A Hugging Face vision model whose ``forward`` takes ``interpolate_pos_encoding`` (ViT, DeiT, DINOv2,
BEiT, CLIP's vision tower…) runs on other image sizes than its config's ``image_size`` when asked to.
Its artifact then takes ``pixel_values`` ``[batch, C, height, width]`` with named dims from two patches
(torch.export specialises a one-patch side) to :data:`MAX_SCALE` × the config's size, and the model is
called with ``interpolate_pos_encoding=True`` by the artifact and its oracles alike.

Those models skip the interpolation at their own size unless ``torch.jit.is_tracing()``, a branch
torch.export would turn into a guard excluding that size; their call therefore runs as if traced, so
eager and exported code both interpolate (at the model's own size a bicubic resize to the same grid,
which leaves the embeddings as they are: verified in ``tests/test_probe_hardening3.py``).

Any other vision model keeps the recorded static size, and a call with another one is refused naming
the expected size (``peftc/feeds.py``).
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


def interpolates(model: Any) -> int | None:
    """The patch size of a Hugging Face vision model that can interpolate its position embeddings, else None."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    patch = getattr(config, "patch_size", None)
    try:
        takes = FLAG in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return patch if takes and isinstance(patch, int) and patch > 0 else None


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
