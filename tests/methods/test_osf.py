"""OSF: the weight op against PEFT's layers (initial factors recomputed from the base weight), the
rank rules, the parser end to end against PEFT, refusals, and a mutation verification must catch."""

from __future__ import annotations

import copy

import models
import pytest
import torch
import tuner_checks as tc
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from torch import nn

import peftc.methods.osf as osf
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter


def _config(**kwargs):
    from peft import OSFConfig

    kwargs.setdefault("target_modules", tc.TARGETS)
    return OSFConfig(**kwargs)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    # int, fraction and default ranks: "mid" by rank_pattern (0.25 of 16 → 4), "up" and "down" by effective_rank.
    return tc.make(tmp_path_factory.mktemp("osf") / "a", _config(effective_rank=3, rank_pattern={"^mi": 0.25}))


def test_op_matches_peft_layers(adapter):
    peft_model = tc.loaded(adapter)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    parsed = load_adapter(adapter, tc.table())
    assert {s.module: s.info["effective_rank"] for s in parsed.sites} == {"up": 3, "mid": 4, "down": 3}
    x = torch.randn(4, 12)
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        assert layer.effective_rank["default"] == site.info["effective_rank"]
        tensors = [site.tensors[r].tensor for r in osf.OSF_WEIGHT.tensor_roles]
        with torch.no_grad():
            delta = osf.delta_weight(*tensors)
            assert tc.rel(delta, layer.get_delta_weight("default")) < 1e-6, site.module
            adapted = osf.OSF_WEIGHT.overload(layer.get_base_layer().weight, *tensors)
            assert tc.rel(adapted, merged.get_submodule(site.module).weight) < 1e-6, site.module
    with torch.no_grad():
        assert tc.rel(merged(x), peft_model(x)) < 1e-5  # PEFT's forward and merge agree


@pytest.mark.parametrize(
    ("value", "smaller", "expected"),
    [(None, 7, 3), (0.5, 7, 3), (1.0, 7, 7), (1, 7, 1), (9, 7, 7), (2.0, 7, 2), (-1, 7, 0)],
)
def test_rank_rules_follow_peft(value, smaller, expected):
    assert osf.resolve_rank(value, smaller) == expected


def test_first_rank_pattern_found_anywhere_in_the_path_wins():
    cfg = {"effective_rank": 2, "rank_pattern": {"attn": 5, "q_proj": 1}}
    assert osf.effective_rank(cfg, "model.layers.0.self_attn.q_proj", 10) == 5
    assert osf.effective_rank(cfg, "model.layers.0.mlp.up_proj", 10) == 2


def test_compiled_program_matches_peft(adapter):
    parsed = tc.check_against_peft(adapter)
    assert [s.module for s in parsed.sites] == ["down", "mid", "up"]
    assert all("from the SVD of" in s.tensors["osf_U_init"].key for s in parsed.sites)


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.mid.osf_svd_params.U_low": torch.ones(16, 5)},
            InputError,
            r"mid\.osf_svd_params\.U_low: shape \[16, 5\] .* expected \[16, 12\] \(effective_rank k=4 of min\(16, 20\)",
        ),
        (None, {"base_model.model.up.osf_svd_params.S_low": None}, InputError, r"module 'up' has no osf_S"),
        ({"rank_pattern": {"down": 0}}, None, InputError, r"effective_rank resolves to 0 for 'down'"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["shape", "missing-factor", "zero-rank", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), tc.table())


class Tied(nn.Module):
    """A linear layer whose weight has singular values 3, 2, 2, 1: no unique top-2 subspace."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
            self.lin.weight.copy_(q @ torch.diag(torch.tensor([3.0, 2.0, 2.0, 1.0])) @ q.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_tied_singular_values_at_the_split_are_refused(tmp_path):
    tensors = {f"base_model.model.lin.osf_svd_params.{n}": torch.ones(s) for n, s in
               (("U_low", (4, 2)), ("S_low", (2,)), ("V_low", (2, 4)))}  # fmt: skip
    path = tc.hand_written(
        tmp_path / "a", {"peft_type": "OSF", "target_modules": ["lin"], "effective_rank": 2}, tensors
    )
    table = ir.module_table(export(Tied().eval(), parse_inputs(["x:batch,4:float32"])))
    with pytest.raises(UnsupportedError, match=r"OSF on 'lin': singular values 2 and 3 of the base weight are equal"):
        load_adapter(path, table)


def test_targeted_layers_peft_does_not_adapt_are_left_alone_with_a_warning(tmp_path):
    tensors = {f"base_model.model.lin.osf_svd_params.{n}": torch.ones(s) for n, s in
               (("U_low", (3, 2)), ("S_low", (2,)), ("V_low", (2, 3)))}  # fmt: skip
    config = {"peft_type": "OSF", "target_modules": ["lin", "conv"], "effective_rank": 1}
    parsed = load_adapter(tc.hand_written(tmp_path / "a", config, tensors), tc.conv_table())
    assert [s.module for s in parsed.sites] == ["lin"]
    assert any("'conv' (Conv1d) is targeted, but PEFT's OSF adapts nn.Linear only" in w for w in parsed.warnings)


def test_mutation_initial_part_not_subtracted_fails_verification(adapter, monkeypatch):
    assert tc.verification_passes(adapter)
    real = osf.delta_weight
    monkeypatch.setattr(osf, "delta_weight", lambda u, s, v, u0, s0, v0: real(u, s, v, u0, s0 * 0, v0))
    assert not tc.verification_passes(adapter)


def test_stacked_first_matches_peft_and_after_another_adapter_is_refused(tmp_path, adapter):
    from peft import HiraConfig

    hira = tc.make(tmp_path / "hira", HiraConfig(target_modules=["mid"], r=2))
    signature = parse_inputs(tc.INPUTS)
    inputs = signature.example({"batch": 3}, seed=3)
    program = adapt(tc.program(), adapter, hira)  # OSF's factors come from the weight it was loaded on
    assert_outputs_close(eager(program, inputs), models.peft_outputs(tc.stack(), [adapter, hira], inputs))
    with pytest.raises(
        UnsupportedError, match=r"on 'mid': OSF's frozen factors are rebuilt from the base weight .* put 'a' first"
    ):
        adapt(tc.program(), hira, adapter)
