"""timm image sizes (``peftc/loaders/vision.py``): a VisionTransformer built by the ``timm:`` loader takes
any multiple of its patch size, checked against PEFT's LoRA on a ViT timm builds with
``dynamic_img_size=True`` (the test's own) and, at the model's own size, on the model as the spec names it;
a side that is no multiple is one line naming the dim; a CNN keeps its sides symbolic from two output
strides; a ViT built with ``dynamic_img_size=false`` keeps its size and says so."""

from __future__ import annotations

import dataclasses

import models
import numpy as np
import pytest
import torch
from conftest import assert_outputs_close
from safetensors.torch import save_file

import peftc
from peftc.errors import InputError
from peftc.loaders.inputs import from_timm
from peftc.loaders.models import load_model
from peftc.report import manifest_text

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 5}
SPEC = "timm:vit_tiny_patch16_224," + ",".join(f"{k}={v}" for k, v in VIT.items())


def _vit(**extra) -> torch.nn.Module:
    timm = models.import_timm()
    return models._seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT, **extra), 0)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``(static ViT, dynamic ViT, adapter, artifact, weights)``: one compile through the ``timm:`` loader."""
    tmp = tmp_path_factory.mktemp("timm-sizes")
    static, dynamic = _vit(), _vit(dynamic_img_size=True)
    weights = tmp / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in static.state_dict().items()}, str(weights))
    adapter = models.make_lora(dynamic, tmp / "adapter", target_modules=["qkv", "fc1", "fc2"])
    artifact = peftc.compile(f"{SPEC}@{weights}", adapter, out=tmp / "out")
    return static, dynamic, adapter, artifact, weights


def test_a_timm_vit_takes_any_multiple_of_its_patch_size(compiled):
    static, dynamic, adapter, artifact, _ = compiled
    manifest = artifact.manifest
    assert manifest.target["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    dims = manifest.target["signature"]["dims"]
    assert [(dims[d]["min"], dims[d]["max"], dims[d]["multiple"]) for d in ("height", "width")] == [(16, 128, 8)] * 2
    assert manifest.model["image_size"].startswith("dynamic: multiples of the patch size 8")
    assert "\nimage size: dynamic: multiples of the patch size 8" in manifest_text(dataclasses.asdict(manifest))
    assert any(c["sizes"]["height"] != c["sizes"]["width"] for c in manifest.verification["cases"])
    assert [dims[d]["natural"] for d in ("height", "width")] == [32, 32]
    assert any((c["sizes"]["height"], c["sizes"]["width"]) == (32, 32) for c in manifest.verification["cases"])
    runner = peftc.load(artifact.path)
    for batch, height, width in ((1, 32, 32), (2, 48, 24), (1, 16, 128)):
        pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        expected = models.peft_outputs(dynamic, adapter, {"x": pixels})
        assert_outputs_close(runner(x=pixels), expected)
        if (height, width) == (32, 32):  # the model as the spec names it, at its own size
            assert_outputs_close(runner(x=pixels), models.peft_outputs(static, adapter, {"x": pixels}))
    assert min(manifest.verification["adapter_effect"].values()) > 0.01


def test_a_side_that_is_no_multiple_of_the_patch_size_is_one_line(compiled):
    runner = peftc.load(compiled[3].path)
    with pytest.raises(InputError, match=r"^input 'x': dim 3 \(width\) is 36, not a multiple of 8 [^\n]*$"):
        runner(x=np.zeros((1, 3, 32, 36), np.float32))


def test_verification_catches_position_embeddings_resampled_wrongly(compiled, monkeypatch):
    """The oracle resamples by nearest neighbour instead of bicubic: the artifact's verification sizes differ
    from the model's own, so the check fails (at 32x32 alone both would agree)."""
    from timm.layers import pos_embed
    from timm.models import vision_transformer

    def nearest(*args, **kwargs):
        return pos_embed.resample_abs_pos_embed(*args, **{**kwargs, "interpolation": "nearest", "antialias": False})

    monkeypatch.setattr(vision_transformer, "resample_abs_pos_embed", nearest)
    assert compiled[3].manifest.verification["passed"]
    assert not peftc.verify(compiled[3].path).passed


def test_verification_checks_the_models_own_size(compiled, monkeypatch):
    """The oracle's position embeddings are wrong only at the model's own size (where timm skips the
    resampling): a verification case at 32x32 catches it; the smaller sizes alone would not."""
    from timm.layers import pos_embed
    from timm.models import vision_transformer

    def broken_at_own_size(posemb, new_size, old_size=None, *args, **kwargs):
        out = pos_embed.resample_abs_pos_embed(posemb, new_size, old_size, *args, **kwargs)
        return out * 0.5 if tuple(new_size) == (4, 4) else out  # 32 px / patch 8

    monkeypatch.setattr(vision_transformer, "resample_abs_pos_embed", broken_at_own_size)
    assert compiled[3].manifest.verification["passed"]
    report = peftc.verify(compiled[3].path)
    failed = {(c.sizes["height"], c.sizes["width"]) for c in report.cases if not c.ok}
    assert not report.passed and failed == {(32, 32)}


def test_a_vit_built_without_dynamic_img_size_keeps_its_size(compiled):
    loaded = load_model(f"{SPEC},dynamic_img_size=false@{compiled[4]}")
    assert loaded.signature.inputs[0].shape == ("batch", 3, 32, 32) and "height" not in loaded.signature.dims
    assert loaded.image_size == "fixed 32x32: VisionTransformer built with dynamic_img_size=False"


def test_a_timm_cnn_keeps_its_sides_symbolic_from_two_output_strides():
    timm = models.import_timm()
    resnet = models._seeded(
        lambda: timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=[8, 8, 8, 8], stem_width=8, num_classes=3),
        0,
    ).eval()
    signature, note = from_timm(resnet)
    assert note == "dynamic: a CNN, from two output strides (64)"
    assert [(signature.dims[d].min, signature.dims[d].max) for d in ("height", "width")] == [(64, 896)] * 2
    example = signature.example(signature.trace_sizes())
    program = torch.export.export(resnet, (example["x"],), dynamic_shapes=signature.dynamic_shapes())
    for height, width in ((64, 64), (65, 97), (130, 70)):
        x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        torch.testing.assert_close(program.module()(x), resnet(x), rtol=1e-5, atol=1e-5)
