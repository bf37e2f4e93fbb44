"""SSF parser: official checkpoints (ViT, Swin, ConvNeXt naming) and the peftc-native format.

Placements are checked against ``reparam_models.ssf_places``, the tests' own reading of the official
code; every refusal the issue lists has a test asserting its message.
"""

from __future__ import annotations

import json

import pytest
import reparam_models as rm
import torch
from safetensors.torch import save_file

from peftc import ir
from peftc.errors import InputError
from peftc.methods.loading import load_adapter


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _parse(tmp_path, kind, tensors, name="ssf.safetensors"):
    _, program = rm.exported(kind)
    return load_adapter(_save(tmp_path / name, tensors), ir.module_table(program))


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
def test_official_keys_sit_where_the_official_code_applies_them(tmp_path, family):
    model, _ = rm.exported(family)
    tensors = rm.ssf_tensors(model, family)
    adapter = _parse(tmp_path, family, tensors)
    got = {s.tensors["ssf_scale"].key: s.module for s in adapter.sites}
    assert got == {key.format("scale"): path for key, (path, _) in rm.ssf_places(model, family).items()} | (
        {"ssf_scale_1": "stages"} if family == "convnext" else {}  # norm_pre is an Identity: the trunk's output
    )
    assert adapter.source.config == {"peft_type": "SSF"}  # no config file: recognised from the keys
    assert all(s.op == "ssf" and s.position == "output" for s in adapter.sites)
    axes = {s.module: s.scalars["axis"] for s in adapter.sites}
    if family == "vit":
        assert axes["patch_embed.proj"] == 1 and axes["blocks.0.attn.qkv"] == 2 and axes["norm"] == 2
    if family == "swin":  # timm's Swin runs NHWC: channels last after the patch embedding
        assert axes["layers.1.downsample.norm"] == 3 and axes["patch_embed.proj"] == 1
    if family == "convnext":
        assert axes["stem.0"] == 1 and axes["stages.0.blocks.0.norm"] == 3 and axes["stages"] == 1


def test_full_state_dict_keeps_only_what_differs(tmp_path):
    model, _ = rm.exported("vit")
    tensors = {**model.state_dict(), **rm.ssf_tensors(model, "vit")}
    tensors["head.weight"] = tensors["head.weight"] + 0.5
    adapter = _parse(tmp_path, "vit", tensors)
    assert [(r.param, r.tensor.key) for r in adapter.replacements] == [("head.weight", "head.weight")]
    assert len(adapter.unused) == len(model.state_dict()) - 1
    assert all(why == "identical to the base model's value" for _, why in adapter.unused)


def test_legacy_official_names_are_mapped(tmp_path):
    model, _ = rm.exported("swin")
    tensors = {"layers.0.downsample.ssf_scale_1": torch.ones(64), "layers.0.downsample.ssf_shift_1": torch.zeros(64)}
    tensors["layers.0.downsample.norm.weight"] = model.state_dict()["layers.1.downsample.norm.weight"] * 2
    tensors["head.bias"] = torch.ones(5)
    adapter = _parse(tmp_path, "swin", tensors)
    assert [s.module for s in adapter.sites] == ["layers.1.downsample.norm"]
    assert sorted(r.param for r in adapter.replacements) == ["head.fc.bias", "layers.1.downsample.norm.weight"]


def test_native_format(tmp_path):
    model, program = rm.exported("resnet")
    tensors = rm.native_ssf(model, {**rm.RESNET_SSF, **rm.RESNET_KEPT})
    path = rm.write_native(
        tmp_path / "native", {"peft_type": "SSF"}, {f"base_model.model.{k}": v for k, v in tensors.items()}
    )
    adapter = load_adapter(path, ir.module_table(program))
    assert {s.module: s.scalars["axis"] for s in adapter.sites} == {
        "stem": 1,
        "bn": 1,
        "bn1": 1,
        "act": 1,
        "act2": 1,
        "gn": 1,
        "norm": 1,
    }
    assert all(s.info["placement"] == "native" for s in adapter.sites)


def test_vector_matching_no_channel_axis_is_refused(tmp_path):
    tensors = {"blocks.0.attn.ssf_scale_1": torch.ones(100), "blocks.0.attn.ssf_shift_1": torch.zeros(100)}
    with pytest.raises(InputError) as error:
        _parse(tmp_path, "vit", tensors)
    message = str(error.value)
    assert "ssf.safetensors:blocks.0.attn.ssf_scale_1: SSF vector of length 100 matches no channel axis" in message
    assert "'blocks.0.attn.qkv' (Linear, shape [s" in message and "144]" in message


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        (
            {"blocks.0.mlp.ssf_scale_3": torch.ones(48), "blocks.0.mlp.ssf_shift_3": torch.ones(48)},
            "Mlp 'blocks.0.mlp' has SSF placements ssf_1 after fc1, ssf_2 after fc2 in the official code, not ssf_3",
        ),
        (
            {"blocks.0.attn.qkv.ssf_scale_1": torch.ones(48), "blocks.0.attn.qkv.ssf_shift_1": torch.ones(48)},
            "SSF on Linear 'blocks.0.attn.qkv' (children []) matches no placement of the official SSF code",
        ),
        ({"blocks.0.ssf_scale_1": torch.ones(48)}, "SSF on 'blocks.0.norm1' has no shift vector"),
        (
            {"blocks.0.ssf_scale_1": torch.ones(48), "blocks.0.ssf_shift_1": torch.ones(47)},
            "SSF scale [48] and shift [47] must be vectors of one length",
        ),
        (
            {
                "blocks.0.ssf_scale_1": torch.ones(48),
                "blocks.0.ssf_shift_1": torch.ones(48),
                "blocks.9.x": torch.ones(1),
            },
            "blocks.9.x: neither an adapter tensor (SSF) nor a parameter of the base model",
        ),
        (
            {
                "blocks.0.ssf_scale_1": torch.ones(48),
                "blocks.0.ssf_shift_1": torch.ones(48),
                "head.weight": torch.ones(7, 48),
            },
            "head.weight: shape [7, 48] does not match base parameter head.weight [5, 48]",
        ),
        (
            {"ssf_scale_2": torch.ones(48), "ssf_shift_2": torch.ones(48)},
            "the model itself has one SSF placement (ssf_1)",
        ),
    ],
    ids=["index", "owner", "half", "lengths", "unknown-key", "head-shape", "root-index"],
)
def test_malformed_official_checkpoints_are_refused(tmp_path, tensors, expected):
    with pytest.raises(InputError, match=None) as error:
        _parse(tmp_path, "vit", tensors)
    assert expected in str(error.value)


def test_bare_file_that_is_not_ssf_still_needs_a_config(tmp_path):
    with pytest.raises(InputError, match="missing adapter config"):
        _parse(tmp_path, "vit", {"blocks.0.attn.qkv.lora_A.weight": torch.ones(4, 48)})


def test_native_module_the_base_lacks_is_refused(tmp_path):
    _, program = rm.exported("resnet")
    tensors = {"stemm.ssf_scale": torch.ones(8), "stemm.ssf_shift": torch.ones(8)}
    path = rm.write_native(tmp_path / "native", {"peft_type": "SSF"}, tensors)
    with pytest.raises(
        InputError, match=r"SSF after module 'stemm', which the base model does not execute; did you mean 'stem'\?"
    ):
        load_adapter(path, ir.module_table(program))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "SSF", "channel_axis": 3}))
    with pytest.raises(Exception, match="channel_axis=3"):
        load_adapter(path, ir.module_table(program))
