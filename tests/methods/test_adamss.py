"""AdaMSS: the weight and bias ops against PEFT's layers (row clusters rebuilt as PEFT rebuilds them),
the parser end to end, refusals, and a mutation verification must catch."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import tuner_checks as tc
from conftest import edited_adapter

import peftc.methods.adamss as adamss
from peftc.errors import InputError, UnsupportedError
from peftc.methods.loading import load_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import AdamssConfig

    config = AdamssConfig(target_modules=tc.TARGETS, r=6, num_subspaces=3, subspace_rank=2, random_seed=4)
    return tc.make(tmp_path_factory.mktemp("adamss") / "a", config)


def test_ops_match_peft_layers(adapter):
    peft_model = tc.loaded(adapter)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    parsed = load_adapter(adapter, tc.table())
    assert {(s.module, s.param) for s in parsed.sites} == {("up", "weight"), ("up", "bias"), ("mid", "weight"),
                                                           ("down", "weight"), ("down", "bias")}  # fmt: skip
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        peft_rows = [layer.seg_result["default"][i] for i in range(layer.num_subspaces["default"])]
        assert site.info["rows"] == [len(r) for r in peft_rows]
        op = adamss.ADAMSS_WEIGHT if site.param == "weight" else adamss.ADAMSS_BIAS
        tensors = [site.tensors[r].tensor for r in op.tensor_roles]
        with torch.no_grad():
            adapted = op.overload(getattr(layer.get_base_layer(), site.param), *tensors)
        expected = getattr(merged.get_submodule(site.module), site.param)
        assert tc.rel(adapted, expected) < 1e-6, (site.module, site.param)


def test_clusters_are_peft_clusters(adapter):
    peft_model = tc.loaded(adapter)
    layer = peft_model.base_model.model.up
    base = layer.get_base_layer()
    augmented = torch.cat([base.weight, base.bias[:, None]], dim=1)
    rows = adamss.clusters(augmented, 6, 3, 4)
    assert torch.equal(torch.cat(rows), layer.scatter_index["default"])


def test_compiled_program_matches_peft(adapter):
    tc.check_against_peft(adapter)


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (None, lambda t: {**t, "base_model.model.mid.adamss_B.0": torch.ones(t["base_model.model.mid.adamss_B.0"].shape[0] + 1, 2)},
         InputError, r"mid\.adamss_B\.0: shape \[\d+, 2\] .* subspace 0 of 'mid' has \d+ rows when clustered as PEFT"),
        (None, {"base_model.model.up.adamss_A.3": torch.ones(2, 6)}, InputError,
         r"up\.adamss_A\.3: 'up' has 3 subspaces \(min\(num_subspaces=3, d_out=20\)\), so PEFT would not load"),
        (None, {"base_model.model.down.adamss_newB": torch.ones(6, 16)}, InputError,
         r"down\.adamss_newB: shape \[6, 16\] .* expected \[r=6, 17\] for 'down'"),
        (None, {"base_model.model.down.adamss_A.1": None}, InputError, r"module 'down' has no A1"),
        ({"num_subspaces": 2}, None, InputError, r"has 2 subspaces .* so PEFT would not load"),
        ({"num_subspaces": 0}, None, InputError, r"num_subspaces=0; give an integer >= 1"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["cluster-size", "extra-subspace", "projection-shape", "missing", "subspace-count", "no-subspaces", "unknown-field"],
)  # fmt: skip
def test_refusals_name_the_cause(tmp_path, adapter, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), tc.table())


def test_without_scikit_learn_it_says_what_to_install(adapter, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(UnsupportedError, match=r"AdaMSS adapters need scikit-learn \(pip install scikit-learn\)"):
        load_adapter(adapter, tc.table())


def test_layers_other_than_linear_are_refused(tmp_path):
    tensors = {"base_model.model.conv.adamss_newB": torch.ones(2, 3)}
    config = {"peft_type": "ADAMSS", "target_modules": ["conv"], "r": 2, "num_subspaces": 1}
    with pytest.raises(UnsupportedError, match=r"AdaMSS on Conv1d \(module 'conv'\) is not supported"):
        load_adapter(tc.hand_written(tmp_path / "a", config, tensors), tc.conv_table())


def test_mutation_rows_placed_one_off_fails_verification(adapter, monkeypatch):
    assert tc.verification_passes(adapter)
    real = adamss.delta
    monkeypatch.setattr(adamss, "delta", lambda left, mid, new_b: real(left.roll(1, 0), mid, new_b))
    assert not tc.verification_passes(adapter)
