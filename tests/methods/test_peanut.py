"""PEANuT: the site op against PEFT's own layers (depths, every activation peftc computes against
transformers' own), the parser against PEFT's files, refusals, and a mutation that verification must
catch."""

from __future__ import annotations

from pathlib import Path

import models
import pytest
import torch
from conftest import edited_adapter, export
from layer_checks import peft_layers, rel, verify_against_peft
from safetensors.torch import load_file
from torch import nn

import peftc.methods.peanut as peanut_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter
from peftc.methods.peanut import ACTIVATIONS, PEANUT_WEIGHT


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 20)
        self.down = nn.Linear(20, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


INPUTS = ["x:batch,6:float32"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import PeanutConfig

    kwargs.setdefault("r", 3)
    kwargs.setdefault("scaling", 2.0)
    return PeanutConfig(target_modules=["up", "down"], **kwargs)


def _stacked(layers) -> torch.Tensor | None:
    return torch.stack([layer.weight for layer in layers]) if len(layers) else None


@pytest.mark.parametrize(("depth", "act_fn"), [(0, "relu"), (1, "gelu_new"), (3, "silu")])
def test_op_matches_peft_layers(depth, act_fn):
    peft_model, merged = peft_layers(mlp(), _config(depth=depth, act_fn=act_fn))
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        encoders, decoders = (_stacked(getattr(layer, f"peanut_{s}")["default"]) for s in ("encoders", "decoders"))
        factors = (layer.peanut_A["default"].weight, layer.peanut_B["default"].weight, encoders, decoders)
        with torch.no_grad():
            adapted = PEANUT_WEIGHT.overload(base.weight, *factors, 2.0, act_fn)
            assert rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, 2, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)  # PEFT's unmerged forward
            assert rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_activations_are_transformers_own():
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 401)
    for name, fn in ACTIVATIONS.items():
        assert torch.allclose(fn(x), ACT2FN[name](x), rtol=1e-6, atol=1e-6), name


def test_every_key_is_a_site_tensor(tmp_path):
    path = models.make_adapter(mlp(), tmp_path / "a", _config(depth=2))
    parsed = load_adapter(path, ir.module_table(export(mlp(), parse_inputs(INPUTS))))
    used = {k for s in parsed.sites for t in s.tensors.values() for k in t.key.split(" + ")}
    assert used == set(load_file(path / "adapter_model.safetensors"))
    assert parsed.sites[0].tensors["peanut_encoders"].tensor.shape == (2, 3, 3)


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mlp(), tmp_path_factory.mktemp("peanut") / "a", _config(depth=1, act_fn="tanh"))


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mlp(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.up.peanut_A.weight": torch.ones(3, 6)},
            InputError,
            r"up\.peanut_A\.weight: shape \[3, 6\] .* expected \[3, 20\] for 'up' \(weight \[20, 6\]\), r=3, depth=1",
        ),
        ({"depth": 2}, None, InputError, r"module 'down' has no peanut_encoders\.1"),
        ({"depth": 0}, None, InputError, r"down\.peanut_decoders\.0\.weight: depth=0, so PEFT creates no such layer"),
        ({"depth": -1}, None, InputError, r"depth=-1; it must be a non-negative integer"),
        ({"act_fn": "prelu"}, None, UnsupportedError, r"act_fn='prelu' is not one peftc computes; supported: relu"),
        ({"bias": "all"}, None, UnsupportedError, r"fields peftc does not know .*bias='all'"),
    ],
    ids=["A-shape", "missing-layer", "extra-layer", "depth", "act-fn", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


class Convolutional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv1d(6, 20, 1)
        self.down = nn.Linear(20, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x).transpose(1, 2))


def test_convolution_target_is_refused_as_peft_does(adapter):
    table = ir.module_table(export(Convolutional().eval(), parse_inputs(["x:batch,6,3:float32"])))
    with pytest.raises(UnsupportedError, match=r"PEANuT on Conv1d \(module 'up'\) is not supported; supported: Linear"):
        load_adapter(adapter, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_without_the_residuals_fails_verification(adapter, monkeypatch):
    """Decoding without adding the encoder's residuals must not pass."""
    assert verify_against_peft(mlp(), adapter, INPUTS, merge=True).passed

    def no_residuals(weight, a, b, encoders, decoders, scaling, act_fn):
        act = ACTIVATIONS[act_fn]
        h = act(weight.T @ a.T)
        for layer in (*encoders.unbind(0), *decoders.unbind(0)):
            h = act(h @ layer.T)
        return (h @ b.T * scaling).T

    monkeypatch.setattr(peanut_ops, "delta_weight", no_residuals)
    for merge in (True, False):
        report = verify_against_peft(mlp(), adapter, INPUTS, merge=merge)
        assert not report.passed
        assert "vs peft" in str(report.error())
