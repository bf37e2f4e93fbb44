"""HRA: the ``hra_weight`` op against PEFT's own layers (forward and merge, with and without
Gram–Schmidt, linear and convolution), the parser's refusals (each convolution PEFT adapts
inconsistently), and a broken formula that verification must catch."""

from __future__ import annotations

import copy
import json
import warnings

import models
import pytest
import torch
from conftest import edited_adapter, export
from peft_check import assert_caught, check_against_peft
from safetensors.torch import save_file
from torch import nn

from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import hra as hra_ops
from peftc.methods.hra import HRA_WEIGHT
from peftc.methods.loading import load_adapter


class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 5)
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


INPUTS = ["x:batch,12:float32"]


def layers() -> nn.Module:
    torch.manual_seed(0)
    return Layers().eval().requires_grad_(False)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("apply_gs", [False, True], ids=["reflections", "gram-schmidt"])
@pytest.mark.parametrize("r", [3, 4])
def test_op_matches_peft_forward_and_merge(r, apply_gs):
    from peft import HRAConfig, get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(layers(), HRAConfig(r=r, apply_GS=apply_gs, target_modules=["lin", "conv"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "hra_u" in name:
                param.copy_(torch.randn_like(param))  # PEFT's symmetric init pairs equal vectors: R = I
    merged = copy.deepcopy(peft_model).merge_and_unload()
    inputs = {"lin": (3, 12), "conv": (2, 2, 6, 6)}
    for name, layout in (("lin", "linear"), ("conv", "conv")):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        with torch.no_grad():
            adapted = HRA_WEIGHT.overload(base.weight, layer.hra_u["default"], apply_gs, layout)
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-5, name
            x = torch.randn(*inputs[name], generator=torch.Generator().manual_seed(2))
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_op_lowers_to_onnx(tmp_path):
    import onnxruntime as ort

    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.weight = nn.Parameter(torch.randn(6, 8, generator=g))
            self.u = nn.Parameter(torch.randn(8, 3, generator=g))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            plain = torch.ops.peftc.hra_weight(self.weight, self.u, False, "linear")
            orthogonalised = torch.ops.peftc.hra_weight(self.weight, self.u, True, "linear")
            return torch.cat([x @ plain.T, x @ orthogonalised.T], dim=-1)

    module = Adapted().eval()
    x = torch.randn(3, 8)
    torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False).save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), module(x)) < 1e-6


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import HRAConfig

    return models.make_adapter(layers(), tmp_path_factory.mktemp("hra") / "a", HRAConfig(r=2, target_modules=["lin"]))


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(layers(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.lin.hra_u": torch.ones(5, 2)},
            InputError,
            r"lin\.hra_u: shape \[5, 2\] .* expected \[12, r=2\] for 'lin' \(weight \[5, 12\]\)",
        ),
        ({"r": 0}, None, InputError, r"r=0; expected an integer >= 1"),
        ({"bias": "hra"}, None, InputError, r"bias='hra'; expected 'none', 'all' or '<method>_only'"),
        ({"use_dora": True}, None, UnsupportedError, r"fields peftc does not know .*use_dora"),
    ],
    ids=["shape", "rank", "bias", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


CONVS = {
    "groups": (nn.Conv2d(4, 4, 3, groups=2), r"groups=2\): PEFT refuses grouped convolutions"),
    "kernel": (nn.Conv2d(4, 4, (3, 1)), r"with a 3×1 kernel: PEFT sizes hra_u for a square kernel"),
    "dilation": (nn.Conv2d(4, 4, 3, dilation=2), r"dilation=\[2, 2\]\): PEFT's forward drops the dilation"),
    "stride": (nn.Conv2d(4, 4, 3, stride=(1, 2)), r"stride=\(1, 2\)\): PEFT's forward uses stride\[0\]"),
    "padding": (nn.Conv2d(4, 4, 3, padding=(1, 0)), r"padding=\(1, 0\)\): PEFT's forward uses padding\[0\]"),
    "padding-mode": (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"padding_mode is not 'zeros'"),
    "conv1d": (nn.Conv1d(4, 4, 3), r"HRA on Conv1d \(module 'layer'\) is not supported"),
}


@pytest.mark.parametrize("case", CONVS)
def test_convolutions_peft_adapts_inconsistently_are_refused(tmp_path, case):
    conv, match = CONVS[case]
    inputs = ["x:batch,4,7,7:float32"] if conv.weight.dim() == 4 else ["x:batch,4,7:float32"]
    table = ir.module_table(export(models.Single(conv).eval(), parse_inputs(inputs)))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "HRA", "target_modules": ["layer"], "r": 2}))
    rows = conv.weight[0].numel()
    save_file({"base_model.model.layer.hra_u": torch.ones(rows, 2)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=match):
        load_adapter(tmp_path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_reflections_in_reverse_order_fail_verification(adapter, monkeypatch):
    """``H_{r−1} … H_0`` (the order PEFT's unmerge uses) instead of ``H_0 … H_{r−1}`` must not pass."""
    assert check_against_peft(layers(), adapter, INPUTS).passed
    real = hra_ops.reflect
    monkeypatch.setattr(hra_ops, "reflect", lambda matrix, u, apply_gs: real(matrix, u.flip(1), apply_gs))
    assert_caught(check_against_peft(layers(), adapter, INPUTS))
