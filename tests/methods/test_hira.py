"""HiRA: the weight op against PEFT's layers of every kind it adapts, the parser end to end, refusals
(one per layer whose PEFT forward and merge disagree), and a mutation verification must catch."""

from __future__ import annotations

import copy

import pytest
import torch
import tuner_checks as tc
from conftest import edited_adapter, export
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc.methods.hira as hira
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter


class Kinds(nn.Module):
    """One layer of each kind PEFT's HiRA adapts (only their weights are compared, so no forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.gpt = Conv1D(5, 8)  # weight [d_in=8, d_out=5]
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(3, 4, (3, 2))
        self.point = nn.Conv2d(3, 4, 1)
        self.seq = nn.Conv1d(4, 2, 3)


LAYOUTS = {"lin": "linear", "gpt": "linear_t", "emb": "embedding", "conv": "conv", "point": "conv", "seq": "conv"}


def test_op_matches_peft_layers():
    from peft import HiraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(Kinds(), HiraConfig(target_modules=list(LAYOUTS), r=3, rank_pattern={"seq": 2}))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "hira_" in name:
                param.copy_(torch.randn_like(param))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name, layout in LAYOUTS.items():
        layer = peft_model.base_model.model.get_submodule(name)
        a, b = (
            (layer.hira_embedding_A, layer.hira_embedding_B) if layout == "embedding" else (layer.hira_A, layer.hira_B)
        )
        with torch.no_grad():
            adapted = hira.HIRA_WEIGHT.overload(layer.get_base_layer().weight, a["default"], b["default"], layout)
        assert tc.rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
        assert tc.rel(adapted, layer.get_base_layer().weight) > 0.1, name


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import HiraConfig

    return tc.make(tmp_path_factory.mktemp("hira") / "a", HiraConfig(target_modules=tc.TARGETS, r=3))


def test_compiled_program_matches_peft(adapter):
    parsed = tc.check_against_peft(adapter)
    assert [(s.module, s.scalars["layout"]) for s in parsed.sites] == [("down", "linear"), ("mid", "linear"),
                                                                        ("up", "linear")]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (None, {"base_model.model.mid.hira_A": torch.ones(3, 16)}, InputError,
         r"mid\.hira_A: shape \[3, 16\] .* expected \[3, 20\] \(r=3\) for 'mid' \(weight \[16, 20\]\)"),
        (None, {"base_model.model.up.hira_embedding_B": torch.ones(20, 3)}, InputError,
         r"up\.hira_embedding_B: Linear 'up' keeps its HiRA factors in hira_A and hira_B"),
        (None, {"base_model.model.down.hira_B": None}, InputError, r"module 'down' has no hira_B"),
        ({"rank_pattern": {"mid": 2}}, None, InputError, r"mid\.hira_A: shape \[3, 20\] .* expected \[2, 20\] \(r=2\)"),
        ({"use_dora": True}, None, UnsupportedError, r"fields peftc does not know .*use_dora"),
    ],
    ids=["shape", "wrong-kind", "missing", "rank-pattern", "unknown-field"],
)  # fmt: skip
def test_refusals_name_the_cause(tmp_path, adapter, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), tc.table())


class Inexact(nn.Module):
    """Layers whose PEFT HiRA forward and merge disagree, or that PEFT refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv1d(2, 4, 3, groups=2)
        self.renorm = nn.Embedding(10, 4, max_norm=1.0)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.reflect(x), self.grouped(x), self.norm(self.renorm(ids))


@pytest.mark.parametrize(
    ("module", "shapes", "match"),
    [
        ("reflect", ((2, 2, 3), (2, 2, 1)), r"HiRA on Conv1d 'reflect', whose padding_mode is not 'zeros'"),
        ("grouped", ((2, 1, 3), (4, 2, 1)), r"HiRA on Conv1d 'grouped' \(groups=2\): PEFT's HiRA refuses grouped"),
        ("renorm", ((2, 10), (4, 2)), r"HiRA on Embedding 'renorm' with max_norm: PEFT's base lookup renormalises"),
        ("norm", ((2, 4), (4, 2)), r"HiRA on LayerNorm \(module 'norm'\) is not supported"),
    ],
)
def test_layers_peft_cannot_merge_exactly_are_refused(tmp_path, module, shapes, match):
    names = ("hira_embedding_A", "hira_embedding_B") if module == "renorm" else ("hira_A", "hira_B")
    tensors = {f"base_model.model.{module}.{n}": torch.ones(s) for n, s in zip(names, shapes)}
    path = tc.hand_written(tmp_path / "a", {"peft_type": "HIRA", "target_modules": [module], "r": 2}, tensors)
    table = ir.module_table(export(Inexact().eval(), parse_inputs(["x:batch,2,5:float32", "ids:batch,3:int64"])))
    with pytest.raises(UnsupportedError, match=match):
        load_adapter(path, table)


def test_mutation_modulation_sign_flipped_fails_verification(adapter, monkeypatch):
    assert tc.verification_passes(adapter)
    real = hira.modulation
    monkeypatch.setattr(hira, "modulation", lambda a, b, layout: -real(a, b, layout))
    assert not tc.verification_passes(adapter)
