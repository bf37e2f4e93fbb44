"""(IA)³: which side each target scales agrees with PEFT; the op equals PEFT's merge; refusals name
the cause; scaling the wrong side is caught by verification."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from conftest import edited_adapter, export

import peftc
from peftc import ir
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders import parse_inputs
from peftc.methods.ia3 import ia3_weight
from peftc.methods.loading import load_adapter


def _ia3(model, path, **config):
    from peft import IA3Config

    return models.make_adapter(model, path, IA3Config(**config))


def test_sides_and_sites_match_peft(tmp_path):
    from peft import PeftModel

    model = models.tiny_bert()
    adapter = _ia3(
        model, tmp_path / "a", target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]
    )
    parsed = load_adapter(adapter, ir.module_table(export(model)))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
    expected = {
        name.removeprefix("base_model.model."): "input" if layer.is_feedforward else "output"
        for name, layer in peft_model.named_modules()
        if hasattr(layer, "ia3_l") and "default" in layer.ia3_l
    }
    assert {s.module: s.info["side"] for s in parsed.sites} == expected
    # Output scaling also scales the bias; input scaling does not.
    params = {(s.module, s.param) for s in parsed.sites}
    assert ("encoder.layer.0.attention.self.query", "bias") in params
    assert ("encoder.layer.0.output.dense", "bias") not in params


LAYERS = {
    "linear": (lambda: torch.nn.Linear(12, 9), "x:batch,12:float32"),
    "conv1d": (lambda: __import__("transformers").pytorch_utils.Conv1D(9, 12), "x:batch,12:float32"),
    "conv": (lambda: torch.nn.Conv2d(4, 6, 3, padding=1), "x:batch,4,8,8:float32"),
    "grouped": (lambda: torch.nn.Conv2d(4, 6, 3, groups=2), "x:batch,4,8,8:float32"),
}


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_merged_weights_equal_peft(tmp_path, kind, feedforward):
    from peft import PeftModel

    build, signature = LAYERS[kind]
    torch.manual_seed(0)
    model = models.Single(build()).eval()
    adapter = _ia3(
        model,
        tmp_path / "a",
        target_modules=["layer"],
        feedforward_modules=["layer"] if feedforward else [],
        fan_in_fan_out=kind == "conv1d",
    )
    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload().layer
    sites = {s.param: s for s in load_adapter(adapter, ir.module_table(export(model, parse_inputs([signature])))).sites}
    assert set(sites) == ({"weight"} if feedforward else {"weight", "bias"})
    for param in ("weight", "bias"):
        base = getattr(model.layer, param).detach()
        site = sites.get(param)
        ours = base if site is None else ia3_weight(base, site.tensors["ia3_l"].tensor, **site.scalars)
        torch.testing.assert_close(ours, getattr(merged, param).detach(), rtol=1e-6, atol=1e-7)
        if param == "weight":
            assert (ours - base).abs().max() > 1e-2 * base.abs().max()  # the vector really scales


@pytest.fixture
def ia3_adapter(tmp_path):
    model = models.tiny_bert()
    return model, _ia3(model, tmp_path / "a", target_modules=["query", "value"], feedforward_modules=["value"])


def test_refuses_a_vector_on_a_module_that_is_not_linear(ia3_adapter, bert_program):
    _, adapter = ia3_adapter
    key = "base_model.model.embeddings.LayerNorm.ia3_l"
    targets = ["query", "value", "embeddings.LayerNorm"]
    edited_adapter(adapter, config={"target_modules": targets}, tensors={key: torch.ones(32, 1)})
    with pytest.raises(
        UnsupportedError, match=r"\(IA\)³ on LayerNorm \(module 'embeddings.LayerNorm'\) is not supported"
    ):
        load_adapter(adapter, ir.module_table(bert_program))


def test_refuses_a_vector_of_the_wrong_shape(ia3_adapter, bert_program):
    _, adapter = ia3_adapter
    key = "base_model.model.encoder.layer.0.attention.self.value.ia3_l"
    edited_adapter(adapter, tensors={key: torch.ones(32, 1)})  # output-side shape on an input-side target
    with pytest.raises(InputError, match=rf"{key}: shape \[32, 1\] does not match .*\[1, 32\] for input"):
        load_adapter(adapter, ir.module_table(bert_program))


def test_mutation_scaling_the_wrong_side_fails_verification(ia3_adapter, tmp_path, monkeypatch):
    import peftc.methods.ia3 as ops

    model, adapter = ia3_adapter
    real = ops.broadcast
    # Square projections: a vector laid along the other axis of W still fits; only the numbers differ.
    monkeypatch.setattr(
        ops, "broadcast", lambda v, w, axis, groups: real(v, w, 1 - axis if w.dim() == 2 else axis, groups)
    )
    with pytest.raises(VerificationError):
        peftc.compile(model, adapter, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
