"""MiSS: the ``miss_weight`` op against PEFT's own layers (forward and merge, each form), its ONNX
lowering, the parser's refusals, and a broken formula that verification must catch."""

from __future__ import annotations

import copy
import json
import warnings

import models
import pytest
import torch
from conftest import edited_adapter, export
from peft_check import assert_caught, check_against_peft
from torch import nn

from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import miss as miss_ops
from peftc.methods.loading import load_adapter
from peftc.methods.miss import MISS_WEIGHT


class Layers(nn.Module):
    """Linears whose inputs are and are not multiples of r, so the balance form pads its chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


INPUTS = ["x:batch,10:float32"]


def layers() -> nn.Module:
    torch.manual_seed(0)
    return Layers().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import MissConfig

    return MissConfig(target_modules=["up", "down"], **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


FORMS = {
    "balance-padded": {"r": 4},  # 10 inputs: the last chunk is padded
    "balance-random-init": {"r": 3, "init_weights": False},
    "mini": {"r": 4, "init_weights": "mini", "mini_r": 2},
    "bat": {"r": 2, "init_weights": "bat"},
}


@pytest.mark.parametrize("form", FORMS)
def test_op_matches_peft_forward_and_merge(form):
    from peft import get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(layers(), _config(**FORMS[form]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "miss_block" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    bat = FORMS[form].get("init_weights") == "bat"
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        with torch.no_grad():
            adapted = MISS_WEIGHT.overload(base.weight, layer.miss_block["default"], bat)
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, 5, base.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_op_lowers_to_onnx_in_each_form(tmp_path):
    import onnxruntime as ort

    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.weight = nn.Parameter(torch.randn(8, 10, generator=g))
            self.balance = nn.Parameter(torch.randn(4, 8, generator=g))
            self.mini = nn.Parameter(torch.randn(3, 2, generator=g))
            self.bat = nn.Parameter(torch.randn(4, 2, 2, generator=g))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            balance = torch.ops.peftc.miss_weight(self.weight, self.balance, False)
            mini = torch.ops.peftc.miss_weight(self.weight, self.mini, False)
            bat = torch.ops.peftc.miss_weight(self.weight, self.bat, True)
            return torch.cat([x @ balance.T, x @ mini.T, x @ bat.T], dim=-1)

    module = Adapted().eval()
    x = torch.randn(3, 10)
    torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False).save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), module(x)) < 1e-6


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(layers(), tmp_path_factory.mktemp("miss") / "a", _config(r=2))


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(layers(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.up.miss_block": torch.ones(2, 10)},
            InputError,
            r"up\.miss_block: shape \[2, 10\] .* expected \[2, 12\] for 'up' \(weight \[12, 10\]\), r=2, init_weights",
        ),
        ({"r": 13}, None, InputError, r"MiSS on 'down' \(weight \[4, 12\]\): r=13 is larger than its 12 inputs"),
        ({"r": 3, "init_weights": "bat"}, None, InputError, r"'bat' needs r=3 to divide both dimensions"),
        ({"init_weights": "mini", "mini_r": 3}, None, InputError, r"needs mini_r=3 to divide d_out=4"),
        ({"init_weights": "orthogonal"}, None, InputError, r"init_weights='orthogonal'; expected true, false"),
        ({"bias": "sometimes"}, None, InputError, r"bias='sometimes'; expected 'none', 'all' or '<method>_only'"),
        ({"rank_pattern": {"up": 4}}, None, UnsupportedError, r"fields peftc does not know .*rank_pattern"),
        (None, {"base_model.model.down.miss_block": None}, InputError, r"module 'down' .* has no tensors for it"),
    ],
    ids=["shape", "r-too-large", "bat-tiles", "mini-divides", "init-weights", "bias", "unknown-field", "missing"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


def test_non_linear_target_is_refused_naming_module_and_type(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "conv"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "MISS", "target_modules": ["layer"], "r": 2}))
    save_file({"base_model.model.layer.miss_block": torch.ones(2, 3)}, path / "adapter_model.safetensors")
    table = ir.module_table(export(models.Single(nn.Conv2d(2, 3, 1)).eval(), parse_inputs(["x:batch,2,3,3:float32"])))
    with pytest.raises(
        UnsupportedError, match=r"MiSS on Conv2d \(module 'layer'\) is not supported; supported: Linear"
    ):
        load_adapter(path, table)


def test_bone_checkpoints_are_not_read(tmp_path, adapter, table):
    """PEFT 0.21 has no BONE type (renamed MISS), so there is no oracle for it: the type is refused."""
    path = edited_adapter(adapter, tmp_path / "bone", config={"peft_type": "BONE"})
    with pytest.raises(UnsupportedError, match=r"peft_type 'BONE' is not supported; supported: .*'MISS'"):
        load_adapter(path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_chunking_by_block_instead_of_by_feature_fails_verification(adapter, monkeypatch):
    """Adding B to whole chunks (row i//r) instead of feature i mod r must not pass."""
    assert check_against_peft(layers(), adapter, INPUTS).passed

    def chunked(weight, block, bat):
        d_in = weight.shape[1]
        rows = torch.arange(d_in) // block.shape[0] % block.shape[0]
        return block.to(torch.float32)[rows].T

    monkeypatch.setattr(miss_ops, "delta_weight", chunked)
    assert_caught(check_against_peft(layers(), adapter, INPUTS))
