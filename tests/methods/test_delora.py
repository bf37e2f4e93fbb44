"""DeLoRA: the site op against PEFT's own layers, the parser against PEFT's files, refusals, and a
mutation that verification must catch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from layer_checks import verify_against_peft
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc.methods.delora as delora_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.delora import DELORA_WEIGHT
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager, pipelines


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


def _config(**kwargs):
    from peft import DeloraConfig

    kwargs.setdefault("r", 4)
    kwargs.setdefault("delora_lambda", 3)
    return DeloraConfig(target_modules=["up", "down"], **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("r", [2, 3])
def test_op_matches_peft_layers(r):
    from peft import get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(mlp(), _config(r=r, init_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "delora_lambda" in name:
                param.copy_(torch.randn_like(param) + 2)
        # A zero row of A exercises PEFT's clamp of the norms at 1e-4.
        peft_model.base_model.model.up.delora_A["default"][0].zero_()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        tensors = [getattr(layer, f"delora_{role}")["default"] for role in ("A", "B", "lambda", "w_norm")]
        with torch.no_grad():
            assert _rel(delora_ops.delta_weight(*tensors, r), layer.get_delta_weight("default")) < 1e-6, name
            adapted = DELORA_WEIGHT.overload(base.weight, *tensors, r)
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, 2, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)  # PEFT's unmerged forward: the decomposed path, not the merge
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_compiled_program_matches_peft(tmp_path, merge):
    """rank_pattern and trained biases (bias='delora_only'), with a stored w_norm unlike the base's norms."""
    config = _config(rank_pattern={"down": 2}, bias="delora_only")
    path = models.make_adapter(mlp(), tmp_path / "a", config)
    # PEFT loads delora_w_norm from the file over the norms it computes: a changed file value must be used.
    edited_adapter(
        path, tensors=lambda t: {**t, "base_model.model.up.delora_w_norm": t["base_model.model.up.delora_w_norm"] * 1.5}
    )
    signature = parse_inputs(INPUTS)
    program = export(mlp(), signature)
    parsed = load_adapter(path, ir.module_table(program))
    assert {s.module: s.scalars["r"] for s in parsed.sites} == {"up": 4, "down": 2}
    assert [r.param for r in parsed.replacements] == ["up.bias"]
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key for s in parsed.sites for t in s.tensors.values()} | {r.tensor.key for r in parsed.replacements}
    assert used == keys
    reference = adapt(program, path)
    final, _ = PassManager(pipelines.optimize(merge=merge)).run(reference, PassContext())
    for batch in (1, 4):
        inputs = signature.example({"batch": batch}, seed=batch)
        expected = models.peft_outputs(mlp(), path, inputs)
        assert_outputs_close(eager(final, inputs), expected)
        assert _rel(eager(program, inputs)["output"], torch.as_tensor(expected["output"])) > 0.02


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mlp(), tmp_path_factory.mktemp("delora") / "a", _config())


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mlp(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.up.delora_A": torch.ones(4, 5)},
            InputError,
            r"up\.delora_A: shape \[4, 5\] .* expected \[4, 6\] for 'up' \(weight \[20, 6\]\), r=4",
        ),
        (
            {"rank_pattern": {"up": 3}},
            None,
            InputError,
            r"up\.delora_A: shape \[4, 6\] .* expected \[3, 6\] .*r=3",
        ),
        (
            None,
            {"base_model.model.down.delora_w_norm": None},
            InputError,
            r"module 'down' has no delora_w_norm",
        ),
        ({"r": 0}, None, InputError, r"r=0 for module 'down'"),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected one of 'none', 'all', 'delora_only'"),
        ({"use_dora": True}, None, UnsupportedError, r"fields peftc does not know .*use_dora"),
        ({"target_modules": ["up"]}, None, InputError, r"module 'down' is not targeted"),
    ],
    ids=["A-shape", "rank-pattern", "w-norm-missing", "rank-zero", "bias", "unknown-field", "untargeted"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


class Gpt2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Conv1D(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_conv1d_target_is_refused_as_peft_does(tmp_path):
    path = tmp_path / "conv1d"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "DELORA", "target_modules": ["proj"], "r": 2}))
    tensors = {f"base_model.model.proj.delora_{k}": torch.ones(s) for k, s in (("A", (2, 4)), ("B", (3, 2)))}
    save_file(tensors, path / "adapter_model.safetensors")
    table = ir.module_table(export(Gpt2Style().eval(), parse_inputs(["x:batch,4:float32"])))
    with pytest.raises(
        UnsupportedError, match=r"DeLoRA on Conv1D \(module 'proj'\) is not supported; supported: Linear"
    ):
        load_adapter(path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_without_the_column_norms_fails_verification(adapter, monkeypatch):
    """Dropping the base column norms w from ΔW must not pass."""
    assert verify_against_peft(mlp(), adapter, INPUTS, merge=True).passed
    real = delora_ops.delta_weight
    monkeypatch.setattr(delora_ops, "delta_weight", lambda a, b, lam, w, r: real(a, b, lam, torch.ones_like(w), r))
    for merge in (True, False):
        report = verify_against_peft(mlp(), adapter, INPUTS, merge=merge)
        assert not report.passed
        assert "vs peft" in str(report.error())
