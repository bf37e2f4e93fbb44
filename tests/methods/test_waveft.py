"""WaveFT: the derived wavelet filters against PEFT's, the ``waveft_weight`` op against PEFT's own
layers (forward and merge; several wavelets, odd sizes, GPT-2 ``Conv1D``, without the inverse
transform), proportional and patterned ``n_frequency`` end to end, the parser's refusals, and a broken
formula that verification must catch."""

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
from peftc.methods import waveft as waveft_ops
from peftc.methods.loading import load_adapter
from peftc.methods.waveft import WAVEFT_WEIGHT


class Mixed(nn.Module):
    """Odd and even sizes (PEFT pads odd ones before the inverse transform), and a GPT-2 ``Conv1D``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 9)
        self.mid = Conv1D(8, 9)  # weight [d_in=9, d_out=8]
        self.down = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


INPUTS = ["x:batch,6:float32"]
TARGETS = ["up", "mid", "down"]


def mixed() -> nn.Module:
    torch.manual_seed(0)
    return Mixed().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import WaveFTConfig

    kwargs.setdefault("n_frequency", 10)
    kwargs.setdefault("scaling", 3.0)
    return WaveFTConfig(target_modules=TARGETS, **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("family", [f"db{i}" for i in range(1, 11)] + ["sym2", "sym3"])
def test_derived_filters_are_peft_filters(family):
    from peft.tuners.waveft.wavelet import Wavelet

    wavelet = Wavelet(family)
    expected = torch.tensor([wavelet.rec_lo, wavelet.rec_hi], dtype=torch.float32)
    assert torch.allclose(waveft_ops.filter_bank(family), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "config",
    [{"wavelet_family": "db1"}, {"wavelet_family": "db3", "random_loc_seed": 4}, {"use_idwt": False}],
    ids=["db1", "db3", "no-idwt"],
)
def test_op_matches_peft_forward_and_merge(config):
    from peft import get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(mixed(), _config(init_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "waveft_spectrum" in name:
                param.mul_(30)  # PEFT's random init is N(0, 0.01²): too small to change outputs visibly
    merged = copy.deepcopy(peft_model).merge_and_unload()
    family = config.get("wavelet_family", "db1")
    filters = waveft_ops.filter_bank(family) if config.get("use_idwt", True) else None
    for name in TARGETS:
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        layout = "linear_t" if isinstance(base, Conv1D) else "linear"
        indices = layer.waveft_indices["default"]
        spectrum = layer.waveft_spectrum["default"]
        with torch.no_grad():
            adapted = WAVEFT_WEIGHT.overload(base.weight, indices, spectrum, filters, 3.0, layout)
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_proportional_and_patterned_frequencies_match_peft_end_to_end(tmp_path):
    program = export(mixed(), parse_inputs(INPUTS))
    configs = {
        "proportional": _config(proportional_parameters=True, wavelet_family="db2"),
        "pattern": _config(n_frequency_pattern={"mid": 20}, bias="all"),
    }
    # Proportional: 3·10 shared by 54, 72 and 40 weights → 9.76, 13.01, 7.23, rounded.
    counts = {"proportional": {"up": 10, "mid": 13, "down": 7}, "pattern": {"up": 10, "mid": 20, "down": 10}}
    for case, config in configs.items():
        path = models.make_adapter(mixed(), tmp_path / case, config)
        parsed = load_adapter(path, ir.module_table(program))
        assert {s.module: s.info["n_frequency"] for s in parsed.sites} == counts[case]
        assert {s.module: s.scalars["layout"] for s in parsed.sites} == {
            "up": "linear",
            "mid": "linear_t",
            "down": "linear",
        }
        reference = adapt(program, path)
        inputs = parse_inputs(INPUTS).example({"batch": 3}, seed=3)
        expected = models.peft_outputs(mixed(), path, inputs)
        assert_outputs_close(eager(reference, inputs), expected)
        assert _rel(eager(program, inputs)["output"], torch.as_tensor(expected["output"])) > 0.02


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(mixed(), tmp_path_factory.mktemp("waveft") / "a", _config(wavelet_family="db2"))


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mixed(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.mid.waveft_spectrum": torch.ones(11)},
            InputError,
            r"mid\.waveft_spectrum: shape \[11\] .* expected \[n_frequency=10\] for 'mid' \(weight \[9, 8\]\)",
        ),
        ({"n_frequency": 41}, None, InputError, r"n_frequency=41 for 'down' \(weight \[5, 8\]\) is more than its 40"),
        ({"wavelet_family": "coif2"}, None, UnsupportedError, r"wavelet_family='coif2': peftc derives .* not the"),
        ({"wavelet_family": "db12"}, None, UnsupportedError, r"wavelet_family='db12': PEFT 0\.21 has no filters"),
        ({"random_loc_seed": -1}, None, InputError, r"random_loc_seed=-1; expected an integer >= 0"),
        ({"use_dora": True}, None, UnsupportedError, r"fields peftc does not know .*use_dora"),
    ],
    ids=["shape", "too-many", "coiflet", "beyond-peft", "seed", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


def test_convolution_is_refused(tmp_path):
    from safetensors.torch import save_file

    table = ir.module_table(export(models.Single(nn.Conv2d(2, 3, 1)).eval(), parse_inputs(["x:batch,2,3,3:float32"])))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "WAVEFT", "target_modules": ["layer"]}')
    save_file({"base_model.model.layer.waveft_spectrum": torch.ones(4)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"WaveFT on Conv2d \(module 'layer'\) is not supported"):
        load_adapter(tmp_path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_swapped_filters_fail_verification(adapter, monkeypatch):
    """Reconstructing with the high- and low-pass filters swapped must not pass."""
    assert check_against_peft(mixed(), adapter, INPUTS).passed
    real = waveft_ops.delta_weight
    monkeypatch.setattr(
        waveft_ops, "delta_weight", lambda i, s, filters, d_out, d_in: real(i, s, filters.flip(0), d_out, d_in)
    )
    assert_caught(check_against_peft(mixed(), adapter, INPUTS))
