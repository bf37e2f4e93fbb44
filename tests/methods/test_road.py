"""RoAd: the site op against PEFT's own layers (every variant, weight and bias), the parser against
PEFT's files, refusals, and a mutation that verification must catch."""

from __future__ import annotations

import json
from pathlib import Path

import models
import pytest
import torch
from conftest import edited_adapter, export
from layer_checks import peft_layers, rel, verify_against_peft
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc.methods.road as road_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter
from peftc.methods.road import ROAD_WEIGHT


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 24)
        self.down = nn.Linear(24, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


INPUTS = ["x:batch,6:float32"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import RoadConfig

    kwargs.setdefault("group_size", 4)
    return RoadConfig(target_modules=["up", "down"], **kwargs)


@pytest.mark.parametrize(("variant", "group_size"), [("road_1", 4), ("road_2", 8), ("road_4", 4)])
def test_op_matches_peft_layers(variant, group_size):
    peft_model, merged = peft_layers(mlp(), _config(variant=variant, group_size=group_size))
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        theta, alpha = layer.road_theta["default"], layer.road_alpha["default"]
        with torch.no_grad():
            params = {"weight": ROAD_WEIGHT.overload(base.weight, theta, alpha, variant, group_size)}
            assert rel(params["weight"], merged.get_submodule(name).weight) < 1e-6, name
            if base.bias is not None:
                params["bias"] = ROAD_WEIGHT.overload(base.bias, theta, alpha, variant, group_size)
                assert rel(params["bias"], merged.get_submodule(name).bias) < 1e-6, name
            x = torch.randn(3, 2, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)  # PEFT's unmerged forward rotates the output, not the weight
            assert rel(torch.func.functional_call(base, params, (x,)), expected) < 1e-5, name
            assert rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_pairs_are_split_by_half_group():
    """road_2, one group of 4: output j pairs with j+2, y₁' = f₁y₁ − s₁y₂, y₂' = f₂y₂ + s₂y₁ (written out)."""
    theta, alpha = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    bias = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    f, s = alpha * theta.cos(), alpha * theta.sin()
    expected = torch.stack(
        [f[0] * 1 - s[0] * 100, f[1] * 10 - s[1] * 1000, f[2] * 100 + s[2] * 1, f[3] * 1000 + s[3] * 10]
    )
    assert rel(ROAD_WEIGHT.overload(bias, theta, alpha, "road_2", 4), expected) < 1e-6


def test_every_key_is_a_site_tensor_weight_and_bias(tmp_path):
    path = models.make_adapter(mlp(), tmp_path / "a", _config(variant="road_4"))
    parsed = load_adapter(path, ir.module_table(export(mlp(), parse_inputs(INPUTS))))
    assert sorted((s.module, s.param) for s in parsed.sites) == [("down", "weight"), ("up", "bias"), ("up", "weight")]
    used = {t.key for s in parsed.sites for t in s.tensors.values()}
    assert used == set(load_file(path / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mlp(), tmp_path_factory.mktemp("road") / "a", _config(variant="road_1"))


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mlp(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            {"variant": "road_2"},
            None,
            InputError,
            r"down\.road_theta: shape \[4\] .* expected \[8\] for 'down' \(weight \[8, 24\]\), variant=road_2",
        ),
        (None, {"base_model.model.up.road_alpha": None}, InputError, r"module 'up' has no road_alpha"),
        ({"variant": "road_3"}, None, InputError, r"variant='road_3'; expected one of road_1, road_2, road_4"),
        ({"group_size": 3}, None, InputError, r"group_size=3; it must be a positive even number"),
        ({"group_size": 0}, None, InputError, r"group_size=0; it must be a positive even number"),
        ({"group_size": 16}, None, InputError, r"group_size=16 does not divide the 8 outputs of 'down'"),
        ({"layers_to_transform": [0]}, None, UnsupportedError, r"fields peftc does not know .*layers_to_transform"),
    ],
    ids=["variant-shape", "missing", "variant", "odd-group", "zero-group", "group-divides", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


class Gpt2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Conv1D(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_conv1d_target_is_refused_as_peft_does(tmp_path):
    path = tmp_path / "conv1d"
    path.mkdir()
    config = {"peft_type": "ROAD", "target_modules": ["proj"], "group_size": 4}
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {f"base_model.model.proj.road_{k}": torch.ones(2) for k in ("theta", "alpha")}
    save_file(tensors, path / "adapter_model.safetensors")
    table = ir.module_table(export(Gpt2Style().eval(), parse_inputs(["x:batch,4:float32"])))
    with pytest.raises(UnsupportedError, match=r"RoAd on Conv1D \(module 'proj'\) is not supported; supported: Linear"):
        load_adapter(path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_rotation_the_other_way_fails_verification(adapter, monkeypatch):
    """Rotating by −θ (y₁' = f y₁ + s y₂) must not pass, merged or not."""
    assert verify_against_peft(mlp(), adapter, INPUTS, merge=True).passed
    real = road_ops.coefficients
    monkeypatch.setattr(road_ops, "coefficients", lambda t, a, v, g: real(-t, a, v, g))
    for merge in (True, False):
        report = verify_against_peft(mlp(), adapter, INPUTS, merge=merge)
        assert not report.passed
        assert "vs peft" in str(report.error())
