"""FourierFT: the frequencies redrawn as PEFT draws them, the ``fourierft_weight`` op against PEFT's
own layers (forward and merge, ``nn.Linear`` and GPT-2 ``Conv1D``), ``n_frequency_pattern`` end to
end, the parser's refusals, and a broken formula that verification must catch."""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from peft_check import assert_caught, check_against_peft
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import fourierft as fourierft_ops
from peftc.methods.fourierft import FOURIERFT_WEIGHT
from peftc.methods.loading import load_adapter


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.mid = Conv1D(8, 10)  # weight [d_in=10, d_out=8]
        self.down = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


INPUTS = ["x:batch,6:float32"]
TARGETS = ["up", "mid", "down"]


def mixed() -> nn.Module:
    torch.manual_seed(0)
    return Mixed().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import FourierFTConfig

    kwargs.setdefault("n_frequency", 12)
    kwargs.setdefault("scaling", 30.0)
    return FourierFTConfig(target_modules=TARGETS, **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("seed", [777, 3])
def test_op_matches_peft_forward_and_merge(seed):
    from peft import get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(mixed(), _config(random_loc_seed=seed))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name in TARGETS:
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        layout = "linear_t" if isinstance(base, Conv1D) else "linear"
        drawn = fourierft_ops.frequencies(seed, 12, layer.out_features, layer.in_features)
        assert torch.equal(drawn, layer.indices["default"])
        spectrum = layer.fourierft_spectrum["default"]
        with torch.no_grad():
            delta = fourierft_ops.delta_weight(drawn, spectrum, 30.0, layer.out_features, layer.in_features)
            assert _rel(delta, layer.get_delta_weight("default")) < 1e-5, name
            adapted = FOURIERFT_WEIGHT.overload(base.weight, drawn, spectrum, 30.0, layout)
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_n_frequency_pattern_and_layouts_match_peft_end_to_end(tmp_path):
    config = _config(n_frequency_pattern={"mid": 20}, random_loc_seed=5, bias="all")
    path = models.make_adapter(mixed(), tmp_path / "a", config)
    program = export(mixed(), parse_inputs(INPUTS))
    parsed = load_adapter(path, ir.module_table(program))
    assert {s.module: s.info["n_frequency"] for s in parsed.sites} == {"up": 12, "mid": 20, "down": 12}
    assert {s.module: s.scalars["layout"] for s in parsed.sites} == {
        "up": "linear",
        "mid": "linear_t",
        "down": "linear",
    }
    assert {r.param for r in parsed.replacements} == {"up.bias", "mid.bias", "down.bias"}  # bias="all"
    reference = adapt(program, path)
    for batch in (1, 3):
        inputs = parse_inputs(INPUTS).example({"batch": batch}, seed=batch)
        expected = models.peft_outputs(mixed(), path, inputs)
        assert_outputs_close(eager(reference, inputs), expected)
        assert _rel(eager(program, inputs)["output"], torch.as_tensor(expected["output"])) > 0.02


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(mixed(), tmp_path_factory.mktemp("fourierft") / "a", _config())


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mixed(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.mid.fourierft_spectrum": torch.ones(11)},
            InputError,
            r"mid\.fourierft_spectrum: shape \[11\] .* expected \[n_frequency=12\] for 'mid' \(weight \[10, 8\]\)",
        ),
        ({"n_frequency": 41}, None, InputError, r"n_frequency=41 for 'down' \(weight \[5, 8\]\) is more than its 40"),
        ({"random_loc_seed": None}, None, InputError, r"random_loc_seed is null: PEFT draws the frequencies from it"),
        ({"scaling": "high"}, None, InputError, r"scaling='high' is not a number"),
        ({"use_dora": True}, None, UnsupportedError, r"fields peftc does not know .*use_dora"),
    ],
    ids=["shape", "too-many", "no-seed", "scaling", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


def test_convolution_is_refused(tmp_path):
    from safetensors.torch import save_file

    table = ir.module_table(export(models.Single(nn.Conv2d(2, 3, 1)).eval(), parse_inputs(["x:batch,2,3,3:float32"])))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "FOURIERFT", "target_modules": ["layer"]}')
    save_file({"base_model.model.layer.fourierft_spectrum": torch.ones(4)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"FourierFT on Conv2d \(module 'layer'\) is not supported"):
        load_adapter(tmp_path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_forward_instead_of_inverse_transform_fails_verification(adapter, monkeypatch):
    """The sine term's sign flipped (cos(α − β): the forward DFT's phase on one axis) must not pass."""
    assert check_against_peft(mixed(), adapter, INPUTS).passed
    real = fourierft_ops.delta_weight

    def conjugated(indices, spectrum, scaling, d_out, d_in):
        flipped = torch.stack([indices[0], (d_in - indices[1]) % d_in])
        return real(flipped, spectrum, scaling, d_out, d_in)

    monkeypatch.setattr(fourierft_ops, "delta_weight", conjugated)
    assert_caught(check_against_peft(mixed(), adapter, INPUTS))
