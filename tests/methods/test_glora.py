"""GLoRA: the site ops against PEFT's own layers (every path form), the bias site reading the weight as
the adapter finds it (stacked after another adapter), the parser against PEFT's files, refusals, and
a mutation that verification must catch."""

from __future__ import annotations

import json
from pathlib import Path

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from layer_checks import peft_layers, rel, verify_against_peft
from safetensors.torch import load_file, save_file
from torch import nn

import peftc.methods.glora as glora_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.glora import GLORA_BIAS, GLORA_WEIGHT
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager, pipelines
from peftc.verification.oracles import weights_oracle


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 20)
        self.down = nn.Linear(20, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


INPUTS = ["x:batch,6:float32"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval().requires_grad_(False)


def _config(forms=("lora", "lora", "constant"), **kwargs):
    from peft import GloraConfig

    a_b, c, d_e = forms
    return GloraConfig(r=3, target_modules=["up", "down"], config_A_B=a_b, config_C=c, config_D_E=d_e, **kwargs)


def _path(term) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(term, "Xd"):
        return term.Xd, term.Xu
    return (term.X if hasattr(term, "X") else term.zeros), None


FORMS = [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "none", "none")]


@pytest.mark.parametrize("forms", FORMS, ids=["-".join(f) for f in FORMS])
def test_ops_match_peft_layers(forms):
    peft_model, merged = peft_layers(mlp(), _config(forms))
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        terms = {t: _path(getattr(layer, f"glora_{t}")["default"]) for t in "ABCDE"}
        with torch.no_grad():
            params = {"weight": GLORA_WEIGHT.overload(base.weight, *terms["A"], *terms["B"])}
            assert rel(params["weight"], merged.get_submodule(name).weight) < 1e-6, name
            if base.bias is not None:
                c, d, e = terms["C"], terms["D"][0], terms["E"][0]
                params["bias"] = GLORA_BIAS.overload(base.bias, base.weight, *c, d, e)
                assert rel(params["bias"], merged.get_submodule(name).bias) < 1e-6, name
            x = torch.randn(3, 2, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)  # PEFT's unmerged forward
            assert rel(torch.func.functional_call(base, params, (x,)), expected) < 1e-5, name
            assert rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_keys_sites_and_unused_bias_terms(tmp_path):
    """'up' gets a bias site then a weight site; 'down' has no bias, so its C/D/E keys are unused."""
    path = models.make_adapter(mlp(), tmp_path / "a", _config())
    parsed = load_adapter(path, ir.module_table(export(mlp(), parse_inputs(INPUTS))))
    assert [(s.module, s.param) for s in parsed.sites] == [("down", "weight"), ("up", "bias"), ("up", "weight")]
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key for s in parsed.sites for t in s.tensors.values() if t is not None}
    unused = {k for k, _ in parsed.unused}
    assert used | unused == keys and not used & unused
    assert unused == {f"base_model.model.down.glora_{t}.zeros" for t in "CDE"}


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_bias_reads_the_weight_left_by_an_earlier_adapter(tmp_path, merge):
    """LoRA then GLoRA: W·C uses the LoRA-merged weight, as PEFT does after merge_and_unload."""
    lora = models.make_lora(mlp(), tmp_path / "lora", target_modules=["up"])
    glora = models.make_adapter(mlp(), tmp_path / "glora", _config(("vector", "lora", "vector")))
    signature = parse_inputs(INPUTS)
    program = export(mlp(), signature)
    reference = adapt(program, lora, glora)
    final, _ = PassManager(pipelines.optimize(merge=merge)).run(reference, PassContext())
    table = ir.module_table(program)
    oracle = weights_oracle(mlp(), [load_adapter(lora, table), load_adapter(glora, table)])
    for batch in (1, 3):
        inputs = signature.example({"batch": batch}, seed=batch)
        expected = models.peft_outputs(mlp(), [lora, glora], inputs)
        assert_outputs_close(eager(final, inputs), expected)
        assert_outputs_close({k: torch.as_tensor(v) for k, v in oracle(inputs).items()}, expected)


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mlp(), tmp_path_factory.mktemp("glora") / "a", _config())


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mlp(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.up.glora_B.Xu": torch.ones(3, 5)},
            InputError,
            r"up\.glora_B\.Xu: shape \[3, 5\] .* expected \[3, 6\] for 'up' \(weight \[20, 6\]\), r=3",
        ),
        (
            {"config_A_B": "vector"},
            None,
            InputError,
            r"down\.glora_A\.Xd: PEFT creates no glora_A\.Xd for 'down' with config_A_B='vector'.*no bias",
        ),
        (None, {"base_model.model.up.glora_E.X": None}, InputError, r"module 'up' has no glora_E\.X"),
        ({"config_D_E": "lora"}, None, InputError, r"config_D_E='lora'; expected one of vector, constant, none"),
        ({"r": 0}, None, InputError, r"r=0 for module 'every target'"),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected one of 'none', 'all', 'glora_only'"),
        ({"layers_to_transform": [0]}, None, UnsupportedError, r"fields peftc does not know .*layers_to_transform"),
    ],
    ids=["shape", "form-mismatch", "missing", "form", "rank", "bias", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.out_proj(x)


def test_linear_subclass_is_refused_as_peft_does(tmp_path):
    """PEFT's GLoRA takes a plain nn.Linear only (NonDynamicallyQuantizableLinear is refused)."""
    path = tmp_path / "subclass"
    path.mkdir()
    config = {"peft_type": "GLORA", "target_modules": ["out_proj"], "config_A_B": "constant"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.attn.out_proj.glora_A.X": torch.ones(1)}, path / "adapter_model.safetensors")
    table = ir.module_table(export(Attention().eval(), parse_inputs(["x:batch,4:float32"])))
    with pytest.raises(UnsupportedError, match=r"GLoRA on NonDynamicallyQuantizableLinear .* supported: Linear"):
        load_adapter(path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_terms_at_half_strength_fail_verification(adapter, monkeypatch):
    """Every GLoRA term (A…E) at half its value must not pass, merged or not."""
    assert verify_against_peft(mlp(), adapter, INPUTS, merge=True).passed
    real = glora_ops.path
    monkeypatch.setattr(glora_ops, "path", lambda first, second: real(first, second) * 0.5)
    for merge in (True, False):
        report = verify_against_peft(mlp(), adapter, INPUTS, merge=merge)
        assert not report.passed
        assert "vs peft" in str(report.error())
