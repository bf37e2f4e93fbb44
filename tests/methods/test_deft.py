"""DEFT: the weight op against PEFT's layers in every form (relu or QR projector, alpha, PaRa, GPT-2
Conv1D, a rank capped by d_out), the parser end to end, refusals, and a mutation verification must catch."""

from __future__ import annotations

import copy

import pytest
import torch
import tuner_checks as tc
from conftest import edited_adapter
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc.methods.deft as deft
from peftc.errors import InputError, UnsupportedError
from peftc.methods.loading import load_adapter


class Layouts(nn.Module):
    """An ``nn.Linear`` and a GPT-2 ``Conv1D`` (only their weights are compared, so no forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(7, 5)
        self.gpt = Conv1D(6, 9)  # weight [d_in=9, d_out=6]


FORMS = {
    "relu": {},
    "qr-alpha": {"decomposition_method": "qr", "alpha": 12},
    "para": {"para": True},
    "para-qr": {"para": True, "decomposition_method": "qr"},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_op_matches_peft_layers(form):
    from peft import DeftConfig, get_peft_model

    torch.manual_seed(0)
    # r=8 is capped to d_out on both layers (5 and 6), as PEFT caps it.
    peft_model = get_peft_model(Layouts(), DeftConfig(target_modules=["lin", "gpt"], r=8, **FORMS[form]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "deft_" in name:
                param.copy_(torch.randn_like(param))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    relu = FORMS[form].get("decomposition_method", "relu") == "relu"
    for name, layout in (("lin", "linear"), ("gpt", "linear_t")):
        layer = peft_model.base_model.model.get_submodule(name)
        r = layer.deft_r["default"]
        p = layer.deft_P["default"]
        q = p if relu else torch.linalg.qr(p.detach())[0]
        scale = FORMS[form]["alpha"] / r if "alpha" in FORMS[form] else 1.0
        injected = layer.deft_R.get("default", None)
        with torch.no_grad():
            adapted = deft.DEFT_WEIGHT.overload(layer.get_base_layer().weight, q, injected, relu, scale, layout)
        assert tc.rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
        assert tc.rel(adapted, layer.get_base_layer().weight) > 0.05, name


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import DeftConfig

    config = DeftConfig(target_modules=tc.TARGETS, r=3, alpha=6, bias="deft_only")
    return tc.make(tmp_path_factory.mktemp("deft") / "a", config)


def test_compiled_program_matches_peft(adapter):
    parsed = tc.check_against_peft(adapter)
    assert {r.param for r in parsed.replacements} == {"up.bias", "down.bias"}  # trained biases (deft_only)
    assert {s.scalars["scale"] for s in parsed.sites} == {2.0}


def test_qr_factor_is_computed_at_parse_time_with_a_warning(tmp_path, adapter):
    path = edited_adapter(adapter, tmp_path / "qr", config={"decomposition_method": "qr"})
    parsed = load_adapter(path, tc.table())
    site = parsed.sites[0]
    assert "(Q of its QR decomposition)" in site.tensors["deft_Q"].key
    assert any("QR factor computed with torch" in w for w in parsed.warnings)
    assert tc.verification_passes(path)


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (None, {"base_model.model.mid.deft_P": torch.ones(16, 4)}, InputError,
         r"mid\.deft_P: shape \[16, 4\] .* expected \[16, 3\] \(r=min\(3, d_out=16\)\) for 'mid'"),
        (None, {"base_model.model.up.deft_R": None}, InputError, r"module 'up' has no deft_R"),
        ({"para": True}, None, InputError, r"down\.deft_R: para=true \(PaRa\) trains no R; PEFT would not load it"),
        ({"decomposition_method": "svd"}, None, InputError, r"decomposition_method='svd'; expected relu or qr"),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected 'none', 'all' or 'deft_only'"),
        ({"use_dora": True}, None, UnsupportedError, r"fields peftc does not know .*use_dora"),
    ],
    ids=["shape", "missing-R", "R-under-para", "decomposition", "bias", "unknown-field"],
)  # fmt: skip
def test_refusals_name_the_cause(tmp_path, adapter, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), tc.table())


def test_layers_other_than_linear_are_refused(tmp_path):
    tensors = {"base_model.model.conv.deft_P": torch.ones(4, 2), "base_model.model.conv.deft_R": torch.ones(2, 2)}
    config = {"peft_type": "DEFT", "target_modules": ["conv"], "r": 2}
    with pytest.raises(UnsupportedError, match=r"DEFT on Conv1d \(module 'conv'\) is not supported"):
        load_adapter(tc.hand_written(tmp_path / "a", config, tensors), tc.conv_table())


def test_mutation_projector_without_relu_fails_verification(adapter, monkeypatch):
    assert tc.verification_passes(adapter)
    real = deft.delta_weight
    monkeypatch.setattr(deft, "delta_weight", lambda q, r, relu, scale, w: real(q, r, False, scale, w))
    assert not tc.verification_passes(adapter)
