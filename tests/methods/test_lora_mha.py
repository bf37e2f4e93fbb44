"""LoRA on nn.MultiheadAttention: both projections adapted as PEFT's layer adapts them, merged and
unmerged against PEFT, one ONNX artifact, refusals (DoRA, lora_bias, separate q/k/v weights, LoRA on
the never-called out_proj), and a mutation verification must catch."""

from __future__ import annotations

import functools

import models
import pytest
import torch
import tuner_checks as tc
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from torch import nn

import peftc
import peftc.methods.lora.mha as mha
from peftc import ir
from peftc.errors import UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager, pipelines
from peftc.verification import peft_oracle, program_oracle, verify

INPUTS = ["x:batch,seq,8:float32"]


class Attention(nn.Module):
    """Self-attention (``nn.MultiheadAttention``, batch first) and a linear head."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(y)


def attention() -> Attention:
    torch.manual_seed(0)
    return Attention().eval().requires_grad_(False)


@functools.cache
def _program() -> ir.Program:
    return export(attention(), parse_inputs(INPUTS))


def _config(**kwargs):
    from peft import LoraConfig

    kwargs.setdefault("target_modules", ["attn", "head"])
    return LoraConfig(r=2, lora_alpha=4, rank_pattern={"attn": 3}, alpha_pattern={"attn": 9}, **kwargs)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(attention(), tmp_path_factory.mktemp("mha") / "a", _config())


def test_the_module_table_gives_the_never_called_out_proj_parameters_to_the_attention():
    table = ir.module_table(_program())
    assert "attn.out_proj" not in table
    assert table["attn"].params["out_proj.weight"] == "attn.out_proj.weight"
    assert table["attn"].params["in_proj_weight"] == "attn.in_proj_weight"


def test_both_projections_get_a_weight_site_with_the_attention_modules_rank(adapter):
    parsed = load_adapter(adapter, ir.module_table(_program()))
    found = {(s.module, s.param): (s.op, s.scalars["scale"]) for s in parsed.sites if s.module == "attn"}
    # PEFT's layer adds the out-projection update twice (peftc/methods/lora/mha.py).
    assert found == {
        ("attn", "in_proj_weight"): ("lora_weight", 3.0),
        ("attn", "out_proj.weight"): ("lora_weight", 6.0),
    }
    assert any("the out-projection update is applied 2×" in w for w in parsed.warnings)


def test_compiled_program_matches_peft(adapter):
    signature = parse_inputs(INPUTS)
    reference = adapt(_program(), adapter)
    for merge in (True, False):
        final, _ = PassManager(pipelines.optimize(merge=merge)).run(reference, PassContext())
        for sizes in ({"batch": 1, "seq": 4}, {"batch": 3, "seq": 5}):
            inputs = signature.example(sizes, seed=sizes["batch"])
            expected = models.peft_outputs(attention(), adapter, inputs)
            assert_outputs_close(eager(final, inputs), expected)
            assert tc.rel(eager(_program(), inputs)["output"], torch.as_tensor(expected["output"])) > 0.02


def test_compiles_to_a_verified_onnx_artifact(tmp_path, adapter):
    artifact = peftc.compile(attention(), adapter, out=tmp_path / "out", merge=False, inputs=INPUTS)
    assert artifact.manifest.verification["passed"]
    assert {c["oracle"] for c in artifact.manifest.verification["cases"]} == {"reference", "peft"}


def _refused(path, table=None):
    with pytest.raises(UnsupportedError) as error:
        load_adapter(path, table or ir.module_table(_program()))
    return str(error.value)


def test_dora_is_refused(tmp_path, adapter):
    message = _refused(edited_adapter(adapter, tmp_path / "dora", config={"use_dora": True}))
    assert "LoRA on nn.MultiheadAttention 'attn' with use_dora: PEFT refuses DoRA on this layer" in message


def test_lora_bias_is_refused(tmp_path, adapter):
    path = edited_adapter(adapter, tmp_path / "bias", config={"lora_bias": True},
                          tensors={"base_model.model.attn.lora_B.bias": torch.ones(24)})  # fmt: skip
    assert "lora_B.bias: lora_bias on nn.MultiheadAttention 'attn': PEFT's merge" in _refused(path)


def test_separate_query_key_value_weights_are_refused(tmp_path):
    tensors = {
        "base_model.model.attn.lora_A.weight": torch.ones(2, 8),
        "base_model.model.attn.lora_B.weight": torch.ones(24, 2),
    }
    path = tc.hand_written(tmp_path / "a", {"peft_type": "LORA", "target_modules": ["attn"], "r": 2}, tensors)
    torch.manual_seed(0)
    model = Attention(kdim=6, vdim=6).eval()

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.inner.head(self.inner.attn(x, memory, memory, need_weights=False)[0])

    table = ir.module_table(export(Cross().eval(), parse_inputs([*INPUTS, "memory:batch,seq,6:float32"])))
    path = tc.hand_written(tmp_path / "b", {"peft_type": "LORA", "target_modules": ["inner.attn"], "r": 2},
                           {k.replace("model.attn", "model.inner.attn"): v for k, v in tensors.items()})  # fmt: skip
    assert "separate query/key/value weights (kdim or vdim differ from embed_dim): PEFT refuses it" in _refused(
        path, table
    )


def test_lora_on_the_out_proj_alone_is_refused(tmp_path):
    path = models.make_adapter(attention(), tmp_path / "a", _config(target_modules=["out_proj"]))
    message = _refused(path)
    assert (
        "LoRA on the out_proj of nn.MultiheadAttention 'attn': PEFT's unmerged forward never calls out_proj" in message
    )


@pytest.mark.parametrize("mutation", ["out-projection-left-out", "out-projection-applied-once"])
def test_mutation_fails_verification(adapter, monkeypatch, mutation):
    def passes() -> bool:
        parsed = load_adapter(adapter, ir.module_table(_program()))
        oracle, why = peft_oracle(attention(), [parsed])
        assert oracle is not None, why
        reference = program_oracle(adapt(_program(), adapter))
        return verify(reference, parse_inputs(INPUTS), {"peft": oracle}).passed

    assert passes()
    if mutation == "out-projection-applied-once":
        monkeypatch.setattr(mha, "OUT_PROJ_APPLICATIONS", 1)
    else:
        real = mha.sites
        monkeypatch.setattr(mha, "sites", lambda *args: [s for s in real(*args) if s.param != "out_proj.weight"])
    assert not passes()
