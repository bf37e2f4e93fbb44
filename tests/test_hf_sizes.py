"""Hugging Face image sizes (``peftc/loaders/vision.py``), as for timm (``tests/test_timm_sizes.py``): a ViT
that interpolates its position embeddings takes multiples of its patch size (checked against PEFT's LoRA
on DeiT at two sizes other than its own), a side that is no multiple is one line naming the dim, TensorRT
profiles keep to the multiples; a windowed Swin keeps its size; a ConvNeXt takes any side from two output
strides. The DeiT compile is for ``--target trt`` where a TensorRT parser is installed (CI), so the
parser reads the ONNX with symbolic image sides; without a GPU its ONNX runs and is verified."""

from __future__ import annotations

import models
import numpy as np
import pytest
import torch
from conftest import assert_outputs_close

import peftc
from peftc.backends.tensorrt import install as trt_install
from peftc.backends.tensorrt.settings import dim_profiles, parse_profile
from peftc.errors import InputError
from peftc.loaders.inputs import from_transformers
from peftc.loaders.models import load_model

TRT_MODULE = trt_install.find_module()
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}


def _deit() -> torch.nn.Module:
    import transformers

    config = transformers.DeiTConfig(**TINY, image_size=32, patch_size=8)
    return models._seeded(lambda: transformers.DeiTModel(config), 0)


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    """``(model, adapter, artifact)``: DeiT with a LoRA on q_proj, v_proj and fc1, compiled once."""
    tmp = tmp_path_factory.mktemp("hf-sizes")
    model = _deit()
    adapter = models.make_lora(model, tmp / "adapter", target_modules=["q_proj", "v_proj", "fc1"])
    target = "trt" if TRT_MODULE else "onnx"
    return model, adapter, peftc.compile(model, adapter, out=tmp / "out", target=target)


def _runner(artifact):
    return peftc.load(artifact.path, runtime="onnx")


def test_deit_takes_multiples_of_its_patch_size_as_peft_computes_them(deit):
    model, adapter, artifact = deit
    manifest = artifact.manifest
    dims = manifest.target["signature"]["dims"]
    assert [(dims[d]["min"], dims[d]["max"], dims[d]["multiple"]) for d in ("height", "width")] == [(16, 128, 8)] * 2
    assert manifest.model["image_size"] == (
        "dynamic: multiples of the patch size 8, position embeddings interpolated (interpolate_pos_encoding)"
    )
    assert all(c["sizes"]["height"] % 8 == 0 == c["sizes"]["width"] % 8 for c in manifest.verification["cases"])
    assert any((c["sizes"]["height"], c["sizes"]["width"]) == (32, 32) for c in manifest.verification["cases"])
    runner = _runner(artifact)
    for batch, height, width in ((2, 24, 40), (1, 64, 16)):
        pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
        expected = models.peft_outputs(model, adapter, {"pixel_values": pixels, "interpolate_pos_encoding": True})
        assert_outputs_close(runner(pixel_values=pixels), expected)
    assert min(manifest.verification["adapter_effect"].values()) > 0.01


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 36, 32), r"dim 2 \(height\) is 36, not a multiple of 8 \(the model takes height 16, 24, ..\)"),
        ((1, 3, 32, 136), r"dim 3 \(width\) is 136, above its maximum 128"),
        ((1, 3, 32, 8), r"dim 3 \(width\) is 8, below its minimum 16"),
    ],
)
def test_a_size_the_model_does_not_take_is_refused_before_running(deit, shape, message):
    """HF's patch convolution would drop the last 4 rows of a 36-pixel side without a word."""
    with pytest.raises(InputError, match=rf"^input 'pixel_values': {message}$"):
        _runner(deit[2])(pixel_values=np.zeros(shape, np.float32))


@pytest.mark.skipif(TRT_MODULE is None, reason=f"TensorRT parser not installed ({trt_install.INSTALL_HINT})")
def test_tensorrt_parses_symbolic_sides_and_its_profile_keeps_to_multiples(deit):
    info = deit[2].manifest.target["tensorrt"]
    assert info["parse"]["inputs"][0]["shape"] == [-1, 3, -1, -1]
    (profile,) = info["profile"]
    assert (profile["min"], profile["opt"], profile["max"]) == ([1, 3, 16, 16], [1, 3, 32, 32], [32, 3, 128, 128])


def test_tensorrt_profile_overrides_must_be_multiples():
    signature = from_transformers(_deit())
    assert dim_profiles(signature, [parse_profile("height:16,64,96")])["height"].opt == 64
    with pytest.raises(InputError, match=r"^--profile height:16,30,128: height takes multiples of 8 only"):
        dim_profiles(signature, [parse_profile("height:16,30,128")])


def test_a_windowed_swin_keeps_its_size_and_says_why():
    """Swin takes ``interpolate_pos_encoding`` but pads to whole windows, which torch.export cannot trace at
    symbolic sides (it failed with a data-dependent guard): its size stays, checked before any export."""
    import transformers

    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
    )
    loaded = load_model(models._seeded(lambda: transformers.SwinModel(config), 0))
    assert loaded.signature.inputs[0].shape == ("batch", 3, 32, 32) and set(loaded.signature.dims) == {"batch"}
    assert loaded.image_size == "fixed 32x32: SwinModel attends within windows (window_size)"


def test_a_convnext_takes_any_side_from_two_output_strides():
    import transformers

    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    model = models._seeded(lambda: transformers.ConvNextModel(config), 0).eval()
    loaded = load_model(model)
    signature = loaded.signature
    assert loaded.image_size == "dynamic: a CNN, from two output strides (16)"
    assert [(signature.dims[d].min, signature.dims[d].max) for d in ("height", "width")] == [(16, 128)] * 2
    example = signature.example(signature.trace_sizes())
    program = torch.export.export(model, (), example, dynamic_shapes=signature.dynamic_shapes())
    for height, width in ((16, 16), (17, 45), (128, 33)):
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        torch.testing.assert_close(program.module()(pixel_values=x)[0], model(pixel_values=x)[0])
