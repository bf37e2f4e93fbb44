"""PSOFT: the weight op against PEFT's layers in every form of R and of the frozen factors (which
peftc rebuilds from the base weight as PEFT does), the parser end to end, refusals, and a mutation
verification must catch."""

from __future__ import annotations

import copy

import pytest
import torch
import tuner_checks as tc
from conftest import edited_adapter

import peftc.methods.psoft as psoft
from peftc.errors import InputError, UnsupportedError
from peftc.methods.loading import load_adapter


def _config(**kwargs):
    from peft import PsoftConfig

    kwargs.setdefault("target_modules", tc.TARGETS)
    kwargs.setdefault("r", 4)
    return PsoftConfig(**kwargs)


FORMS = {
    "cayley": {},
    "neumann": {"use_cayley_neumann": True, "num_cayley_neumann_terms": 6},
    "neumann-eps": {"use_cayley_neumann": True, "cayley_neumann_eps": 0.5, "num_cayley_neumann_terms": 3},
    "free-R": {"psoft_orth": False},
    "no-vectors": {"psoft_mag_a": False, "psoft_mag_b": False, "psoft_alpha": 8},
    "pissa": {"ab_svd_init": "pissa_init", "r": 3},
    "lowrank": {"psoft_svd": "lowrank", "random_seed": 5, "psoft_svd_lowrank_niter": 3},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_op_matches_peft_layers(tmp_path, form):
    # noise 1.0: R far from the identity, so the Neumann projection and series terms matter.
    path = tc.make(tmp_path / "a", _config(**FORMS[form]), noise=1.0)
    peft_model = tc.loaded(path)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    parsed = load_adapter(path, tc.table())
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        a, b = layer._get_psoft_ab_cache_buffers("default")
        assert torch.equal(site.tensors["psoft_A"].tensor, a) and torch.equal(site.tensors["psoft_B"].tensor, b)
        tensors = [t.tensor if t else None for t in (site.tensors[r] for r in psoft.PSOFT_WEIGHT.tensor_roles)]
        scalars = [site.scalars[s] for s in psoft.PSOFT_WEIGHT.scalars]
        with torch.no_grad():
            r = psoft.rotation(a.shape[0], *tensors[2:], *scalars[:-1])
            assert tc.rel(r, layer.psoft_R["default"].get_matrix()) < 1e-6, site.module
            adapted = psoft.PSOFT_WEIGHT.overload(layer.get_base_layer().weight, *tensors, *scalars)
            assert tc.rel(adapted, merged.get_submodule(site.module).weight) < 1e-6, site.module
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert tc.rel(merged(x), peft_model(x)) < 1e-5  # PEFT's forward and merge agree
        assert tc.rel(tc.stack()(x), peft_model(x)) > 0.02


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return tc.make(tmp_path_factory.mktemp("psoft") / "a", _config(use_cayley_neumann=True))


def test_compiled_program_matches_peft(adapter):
    parsed = tc.check_against_peft(adapter)
    assert [s.module for s in parsed.sites] == ["down", "mid", "up"]
    assert any("recomputed from the base weights' SVD" in w for w in parsed.warnings)


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (None, {"base_model.model.mid.psoft_R.weight": torch.ones(10)}, InputError,
         r"mid\.psoft_R\.weight: shape \[10\] .* expected \[6\] \(r=4, psoft_orth=True\) for 'mid'"),
        ({"psoft_mag_a": False}, None, InputError, r"down\.psoft_R\.vector_a: psoft_mag_a=false, so PEFT would not"),
        (None, {"base_model.model.up.psoft_R.vector_b": None}, InputError, r"module 'up' has no psoft_vector_b"),
        ({"r": 8}, None, InputError, r"r=8 exceeds min\(d_out, d_in\) of 'down' \(weight \[6, 16\]\)"),
        ({"ab_svd_init": "olora"}, None, InputError, r"ab_svd_init='olora'; expected one of psoft_init, pissa_init"),
        ({"rank_pattern": {"up": 2}}, None, UnsupportedError, r"fields peftc does not know .*rank_pattern"),
    ],
    ids=["shape", "vector-not-trained", "vector-missing", "r-too-large", "init", "unknown-field"],
)  # fmt: skip
def test_refusals_name_the_cause(tmp_path, adapter, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), tc.table())


def test_layers_other_than_linear_are_refused(tmp_path):
    tensors = {"base_model.model.conv.psoft_R.weight": torch.zeros(1)}
    config = {"peft_type": "PSOFT", "target_modules": ["conv"], "r": 2, "psoft_mag_a": False, "psoft_mag_b": False}
    with pytest.raises(UnsupportedError, match=r"PSOFT on Conv1d \(module 'conv'\) is not supported"):
        load_adapter(tc.hand_written(tmp_path / "a", config, tensors), tc.conv_table())


def test_mutation_rotation_transposed_fails_verification(adapter, monkeypatch):
    assert tc.verification_passes(adapter)
    real = psoft.rotation
    monkeypatch.setattr(psoft, "rotation", lambda *args: real(*args).T)
    assert not tc.verification_passes(adapter)


def test_cayley_neumann_form_with_projection_exports_to_onnx(tmp_path):
    """The matrix's ONNX cell lowers the exact Cayley form; this lowers the series with its projection."""
    import onnxruntime as ort
    from torch import nn

    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            shapes = ((5, 7), (4, 7), (5, 4), (6,), (4,), (4,))  # W, A, B, q, a, b (r=4)
            self.tensors = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g)) for s in shapes])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, a, b, q, va, vb = self.tensors
            return x @ torch.ops.peftc.psoft_weight(w, a, b, q, va, vb, True, True, 5, 0.5, 2.0).T

    module = Adapted().eval()
    x = torch.randn(3, 7)
    torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False).save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert tc.rel(torch.from_numpy(got), module(x)) < 1e-6
