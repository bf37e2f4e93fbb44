"""Super-Tuning: the site op against PEFT's own layers (with and without the LoRA term), positions
saved or chosen again from the base weight as PEFT does, refusals, and a mutation that verification
must catch."""

from __future__ import annotations

import json
from pathlib import Path

import models
import pytest
import torch
from conftest import adapt, edited_adapter, export
from layer_checks import peft_layers, rel, verify_against_peft
from safetensors.torch import load_file
from torch import nn

import peftc.methods.supertuning as supertuning_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter
from peftc.methods.supertuning import SUPERTUNING_WEIGHT


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
    from peft import SupertuningConfig

    kwargs.setdefault("sparsity", 0.7)
    return SupertuningConfig(target_modules=["up", "down"], **kwargs)


@pytest.mark.parametrize(("top", "r"), [(True, None), (False, 2)])
def test_op_matches_peft_layers(top, r):
    peft_model, merged = peft_layers(mlp(), _config(select_top=top, r=r, init_weights=False))
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        lora = [layer.supertuning_lora_A["default"].weight, layer.supertuning_lora_B["default"].weight] if r else []
        tensors = [layer.supertuning_indices["default"], layer.supertuning_values["default"], *(lora or [None, None])]
        with torch.no_grad():
            adapted = SUPERTUNING_WEIGHT.overload(base.weight, *tensors, 2.0 if r else 0.0)  # α = 2r by default
            assert rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, 2, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)  # PEFT's unmerged forward
            assert rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_repeated_positions_add_up():
    weight = torch.zeros(2, 3)
    adapted = SUPERTUNING_WEIGHT.overload(weight, torch.tensor([4, 1, 4]), torch.tensor([1.0, 2.0, 3.0]), None, None, 0)
    assert torch.equal(adapted, torch.tensor([[0.0, 2.0, 0.0], [0.0, 4.0, 0.0]]))


@pytest.mark.filterwarnings("ignore:save_precomputed_indices=False")  # PEFT's own warning when it chooses again
@pytest.mark.parametrize("saved", [True, False], ids=["saved", "chosen-again"])
def test_positions_saved_or_chosen_again_match_peft(tmp_path, saved):
    path = models.make_adapter(mlp(), tmp_path / "a", _config(select_top=False, save_precomputed_indices=saved))
    parsed = load_adapter(path, ir.module_table(export(mlp(), parse_inputs(INPUTS))))
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key.removesuffix(" as int64") for s in parsed.sites for t in s.tensors.values() if t is not None}
    assert used & keys == keys
    assert any("chosen again" in w for w in parsed.warnings) != saved
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(mlp(), str(path))
    for site in parsed.sites:
        expected = peft_model.base_model.model.get_submodule(site.module).supertuning_indices["default"]
        assert torch.equal(site.tensors["supertuning_indices"].tensor, expected.to(torch.int64))
    assert verify_against_peft(mlp(), path, INPUTS, merge=False).passed


def test_saved_positions_peft_ignores_are_recorded_unused(tmp_path):
    path = models.make_adapter(mlp(), tmp_path / "a", _config())
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "save_precomputed_indices": False}))
    parsed = load_adapter(path, ir.module_table(export(mlp(), parse_inputs(INPUTS))))
    assert {k for k, _ in parsed.unused} == {f"base_model.model.{m}.supertuning_indices" for m in ("up", "down")}


@pytest.mark.filterwarnings("ignore:save_precomputed_indices=False")
def test_chosen_positions_after_an_earlier_adapter_are_refused(tmp_path):
    """Positions chosen from the base weight: PEFT would choose them from the weight a stacked LoRA leaves."""
    lora = models.make_lora(mlp(), tmp_path / "lora", target_modules=["down"])
    chosen = models.make_adapter(mlp(), tmp_path / "chosen", _config(save_precomputed_indices=False))
    program = export(mlp(), parse_inputs(INPUTS))
    with pytest.raises(UnsupportedError, match=r"'chosen' on 'down': Super-Tuning's positions are chosen .* 'lora'"):
        adapt(program, lora, chosen)
    adapt(program, chosen, lora)  # the other order is PEFT's too: positions from the base weight


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mlp(), tmp_path_factory.mktemp("super") / "a", _config(r=2), noise=1.0)


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mlp(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        ({"sparsity": 0.9}, None, InputError, r"down\.supertuning_values: shape \[30\] .* expected \[9\] .*k=9"),
        (
            None,
            {"base_model.model.up.supertuning_indices": torch.full((36,), 120, dtype=torch.int32)},
            InputError,
            r"up\.supertuning_indices: positions outside the weight's 120 entries",
        ),
        (
            None,
            {"base_model.model.up.supertuning_indices": torch.zeros(36)},
            InputError,
            r"up\.supertuning_indices: dtype torch\.float32; sparse positions are integers",
        ),
        ({"r": None, "lora_alpha": None}, None, InputError, r"r is unset, so PEFT creates no LoRA factors"),
        ({"sparsity": 1.0}, None, InputError, r"sparsity=1\.0; it must be in \[0, 1\)"),
        ({"sparsity": 0.999}, None, InputError, r"sparsity=0\.999 leaves no entry of 'down'"),
        (
            None,
            {"base_model.model.down.supertuning_lora_B.weight": None},
            InputError,
            r"'down' has no supertuning_lora_B",
        ),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["k", "range", "dtype", "lora-without-r", "sparsity", "empty", "lora-missing", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


class Convolutional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv1d(6, 20, 1)
        self.down = nn.Linear(20, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x).transpose(1, 2))


def test_convolution_target_is_refused_as_peft_does(adapter):
    table = ir.module_table(export(Convolutional().eval(), parse_inputs(["x:batch,6,3:float32"])))
    with pytest.raises(UnsupportedError, match=r"Super-Tuning on Conv1d \(module 'up'\) is not supported"):
        load_adapter(adapter, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_values_written_over_the_weight_fails_verification(adapter, monkeypatch):
    """Writing the values at their positions (W[p] = v) instead of adding them must not pass."""
    assert verify_against_peft(mlp(), adapter, INPUTS, merge=True).passed
    monkeypatch.setattr(supertuning_ops, "add_at", lambda flat, p, v: flat.scatter(0, p.long(), v.float()))
    for merge in (True, False):
        report = verify_against_peft(mlp(), adapter, INPUTS, merge=merge)
        assert not report.passed
        assert "vs peft" in str(report.error())
