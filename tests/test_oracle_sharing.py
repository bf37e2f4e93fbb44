"""PEFT's oracle of one adapter shares the base model's weights instead of copying them (a compile's
peak memory), computes what PEFT computes on a copy, and refuses to go on if PEFT wrote into them."""

from __future__ import annotations

import copy

import models
import numpy as np
import peft
import pytest
import torch

from peftc.methods.loading import load_adapter
from peftc.verification.oracles import peft_oracle, to_numpy


@pytest.fixture
def built(bert_adapter, bert_table, monkeypatch):
    """The base module, the adapter, and the models PEFT was handed (captured)."""
    handed = []
    original = peft.PeftModel.from_pretrained

    def capture(model, *args, **kwargs):
        handed.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", capture)
    return models.tiny_bert(), load_adapter(bert_adapter, bert_table), handed


def test_one_adapter_shares_the_base_weights_and_matches_peft_on_a_copy(built, bert_adapter):
    module, adapter, handed = built
    inputs = models.text_inputs(2, 6)
    with torch.no_grad():
        base = to_numpy(module(**inputs))
    oracle, why = peft_oracle(module, [adapter])
    assert oracle is not None, why
    ours = {p.data_ptr() for p in module.parameters()}
    assert ours <= {p.data_ptr() for p in handed[0].parameters()}  # the same storage, not a copy
    independent = peft.PeftModel.from_pretrained(copy.deepcopy(module), str(bert_adapter)).eval()
    with torch.no_grad():
        expected = to_numpy(independent(**inputs))
        after = to_numpy(module(**inputs))
    got = oracle(inputs)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert not np.allclose(got["last_hidden_state"], base["last_hidden_state"])  # the adapter matters
    assert all(np.array_equal(after[k], base[k]) for k in base)  # the base module is unchanged


def test_a_write_into_the_shared_weights_is_caught(built, monkeypatch):
    """A PEFT that changed a base weight in place (through ``.data``, which no version counter sees)."""
    module, adapter, _ = built
    capture = peft.PeftModel.from_pretrained

    def writing(model, *args, **kwargs):
        next(model.parameters()).data.mul_(2.0)
        return capture(model, *args, **kwargs)

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", writing)
    with pytest.raises(AssertionError, match="PEFT changed the base weights"):
        peft_oracle(module, [adapter])


def test_an_adapter_with_whole_tensors_gets_its_own_copy(built, bert_adapter, bert_table, tmp_path):
    """PEFT loads trained biases into the base layers in place: such an adapter's oracle copies the base."""
    from conftest import edited_adapter

    module, _, handed = built
    bias = {"base_model.model.encoder.layer.0.attention.self.query.bias": torch.full((32,), 0.5)}
    edited = edited_adapter(bert_adapter, tmp_path / "bias", config={"bias": "all"}, tensors=bias)
    adapter = load_adapter(edited, bert_table)
    assert adapter.replacements
    oracle, why = peft_oracle(module, [adapter])
    assert oracle is not None, why
    assert not {p.data_ptr() for p in module.parameters()} & {p.data_ptr() for p in handed[0].parameters()}
    assert torch.equal(
        module.encoder.layer[0].attention.self.query.bias, models.tiny_bert().encoder.layer[0].attention.self.query.bias
    )
