"""ZeroI2V parser: official checkpoint naming (CLIP block paths), peftc-native keys, STDHA config.

Every refusal the issue lists has a test asserting its message: an adapter at an unknown placement
(official and native) and STDHA asked of a model with no time axis.
"""

from __future__ import annotations

import pytest
import reparam_models as rm
import torch

from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.methods.loading import load_adapter

CONFIG = {"peft_type": "ZEROI2V", "scale": 0.5, "num_frames": rm.FRAMES, "stdha": {"shift_div": 12}}
# one adapter before an in-projection of width 48, in peftc's native naming
ONE = {
    "blocks.0.attn.qkv.zeroi2v_in.down.weight": torch.ones(8, 48),
    "blocks.0.attn.qkv.zeroi2v_in.up.weight": torch.ones(48, 8),
}
VIDEO_ONE = {f"vit.{k}": v for k, v in ONE.items()}


@pytest.fixture(scope="module")
def video():
    model, program = rm.exported("video")
    return model, program, rm.zeroi2v_adapters(model)


def _load(tmp_path, program, tensors, config=CONFIG, name="z"):
    return load_adapter(rm.write_native(tmp_path / name, config, tensors), ir.module_table(program))


def test_official_placements_map_to_the_projections(tmp_path, video):
    _, program, adapters = video
    adapter = _load(tmp_path, program, rm.zeroi2v_official_tensors(adapters))
    linear = [(s.module, s.position, s.info["placement"]) for s in adapter.sites if s.op == "linear_adapter"]
    assert sorted(linear) == sorted(
        (f"vit.blocks.{i}.{module}", "input" if side == "in" else "output", f"{name} of vit.blocks.{i}")
        for i in (0, 1)
        for name, (module, side) in rm.NATIVE_MODULES.items()
    )
    site = next(s for s in adapter.sites if s.op == "linear_adapter")
    assert site.scalars == {"scale": 0.5, "residual": True}
    assert site.tensors["down_weight"].key.startswith("backbone.transformer.resblocks.")
    shifts = [s for s in adapter.sites if s.op == "temporal_shift"]
    # width 48: fold 48 // 12 = 4 key channels move +1 frame, the next 4 move -1; values likewise at 96
    assert [s.module for s in shifts] == ["vit.blocks.0.attn.qkv", "vit.blocks.1.attn.qkv"]
    assert shifts[0].scalars == {
        "frames": rm.FRAMES,
        "batch_axis": 0,
        "spans": [48, 52, 1, 52, 56, -1, 96, 100, 1, 100, 104, -1],
    }


def test_native_keys_give_the_same_sites(tmp_path, video):
    _, program, adapters = video
    official = _load(tmp_path, program, rm.zeroi2v_official_tensors(adapters), name="o")
    native = _load(tmp_path, program, rm.zeroi2v_native_tensors(adapters), name="n")

    def key(site):
        tensors = tuple(t.tensor.sum().item() for t in site.tensors.values())
        return site.module, site.op, site.position, tensors, tuple(site.scalars.items())

    assert sorted(map(key, official.sites)) == sorted(map(key, native.sites))


def test_long_shift_and_stride(tmp_path, video):
    _, program, _ = video
    config = dict(CONFIG, stdha={"shift_div": 12, "shift_stride": 2, "long_shift_div": 24})
    adapter = _load(tmp_path, program, VIDEO_ONE, config)
    assert [s.op for s in adapter.sites] == ["linear_adapter", "temporal_shift", "temporal_shift"]
    assert adapter.sites[1].scalars["spans"][:9] == [48, 52, 2, 52, 56, -2, 56, 58, 2]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "backbone.transformer.resblocks.0.Q_Adapter.D_fc1.weight",
            "unknown ZeroI2V placement 'Q_Adapter'; the official code has T_Adapter_in, S_Adapter, MLP_Adapter, MLP_Adapter_out",
        ),
        (
            "vit.blocks.0.attn.qkv.zeroi2v_mid.down.weight",
            "unknown ZeroI2V placement zeroi2v_mid (zeroi2v_in: before the Linear, zeroi2v_out: after it)",
        ),
        (
            "vit.blocks.0.norm1.zeroi2v_in.down.weight",
            "unknown ZeroI2V placement: LayerNorm 'vit.blocks.0.norm1' is not a linear projection",
        ),
    ],
    ids=["official-name", "native-side", "native-not-linear"],
)
def test_adapter_at_an_unknown_placement_is_refused(tmp_path, video, key, expected):
    _, program, _ = video
    with pytest.raises(InputError) as error:
        _load(tmp_path, program, {key: torch.ones(8, 48)})
    assert expected in str(error.value)


def test_stdha_on_a_model_without_time_axis_is_refused(tmp_path):
    _, program = rm.exported("vit")  # an image ViT: its qkv's axis 0 is the batch alone
    with pytest.raises(InputError) as error:
        _load(tmp_path, program, ONE)
    message = str(error.value)
    assert "STDHA needs a time axis: frames folded into the batch axis" in message
    assert "the output of 'blocks.0.attn.qkv' is [s" in message and "is not a multiple of num_frames=3" in message


@pytest.mark.parametrize(
    ("config", "tensors", "error", "expected"),
    [
        (dict(CONFIG, scale=None), True, InputError, "no 'scale': the script-level adapter scale"),
        (dict(CONFIG, num_frames=None), False, InputError, "STDHA needs num_frames"),
        (dict(CONFIG, stdha={"divide_head": True}), False, UnsupportedError, "raise NotImplementedError"),
        (dict(CONFIG, stdha={"shift_div": 1}), False, InputError, "do not fit 48 key channels"),
        (dict(CONFIG, stdha={"shift_div": 12, "mode": 1}), False, UnsupportedError, "stdha fields peftc does not know"),
        (dict(CONFIG, adapter_type="conv"), True, UnsupportedError, "ZeroI2V adapters are linear"),
    ],
    ids=["no-scale", "no-frames", "divide-head", "too-many-channels", "unknown-stdha-field", "adapter-type"],
)
def test_bad_configs_are_refused(tmp_path, video, config, tensors, error, expected):
    _, program, adapters = video
    with pytest.raises(error, match=None) as raised:
        _load(tmp_path, program, rm.zeroi2v_official_tensors(adapters) if tensors else VIDEO_ONE, config)
    assert expected in str(raised.value)


def test_adapter_shape_must_fit_its_projection(tmp_path, video):
    _, program, adapters = video
    tensors = rm.zeroi2v_official_tensors(adapters)
    tensors["backbone.transformer.resblocks.1.S_Adapter.D_fc2.weight"] = torch.ones(47, 8)
    with pytest.raises(
        InputError, match=r"D_fc2.weight: shape \[47, 8\] does not match the base model: expected \[48, 8\]"
    ):
        _load(tmp_path, program, tensors)
