"""SHiRA: the ``shira_weight`` op against PEFT's own layers (forward and merge), indices read from the
file (integers or Windows floats) or redrawn as PEFT redraws them, the parser's refusals, and a broken
formula that verification must catch."""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from peft_check import assert_caught, check_against_peft
from torch import nn

from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import shira as shira_ops
from peftc.methods.loading import load_adapter
from peftc.methods.shira import SHIRA_WEIGHT


class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


INPUTS = ["x:batch,10:float32"]
KEY = "base_model.model.up.shira_indices"


def layers() -> nn.Module:
    torch.manual_seed(0)
    return Layers().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import ShiraConfig

    return ShiraConfig(target_modules=["up", "down"], r=1, **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("seed", [None, 5])
def test_op_matches_peft_forward_and_merge(seed):
    from peft import get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(layers(), _config(random_seed=seed))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "shira_weight" in name:
                param.copy_(torch.randn_like(param))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name in ("up", "down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        rows, columns = layer.shira_indices["default"].long()
        with torch.no_grad():
            adapted = SHIRA_WEIGHT.overload(
                base.weight, rows * base.in_features + columns, layer.shira_weight["default"]
            )
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(layers(), tmp_path_factory.mktemp("shira") / "a", _config(random_seed=3), noise=1.0)


@pytest.fixture(scope="module")
def program():
    return export(layers(), parse_inputs(INPUTS))


def _matches_peft(path, program) -> None:
    reference = adapt(program, path)
    for batch in (1, 3):
        inputs = parse_inputs(INPUTS).example({"batch": batch}, seed=batch)
        expected = models.peft_outputs(layers(), path, inputs)
        assert_outputs_close(eager(reference, inputs), expected)
        assert _rel(eager(program, inputs)["output"], torch.as_tensor(expected["output"])) > 0.02


@pytest.mark.parametrize("case", ["saved", "windows-floats", "redrawn"])
def test_indices_saved_or_redrawn_match_peft(tmp_path, adapter, program, case):
    def edit(tensors):
        indices = {k: v for k, v in tensors.items() if k.endswith("shira_indices")}
        if case == "windows-floats":
            return {**tensors, **{k: v.float() for k, v in indices.items()}}
        return {k: v for k, v in tensors.items() if k not in indices} if case == "redrawn" else tensors

    path = edited_adapter(adapter, tmp_path / case, tensors=edit)
    parsed = load_adapter(path, ir.module_table(program))
    assert any("redrawn" in w for w in parsed.warnings) == (case == "redrawn")
    _matches_peft(path, program)


# --------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.up.shira_weight": torch.ones(21)},
            InputError,
            r"up\.shira_weight: shape \[21\] .* expected \[r·\(d_in \+ d_out\)=22\] for 'up' \(weight \[12, 10\]\), r=1",
        ),
        (
            None,
            {KEY: torch.zeros(2, 21, dtype=torch.int32)},
            InputError,
            r"up\.shira_indices: shape \[2, 21\] .* \[2, 22\]",
        ),
        (
            None,
            {KEY: torch.tensor([[0] * 21 + [12], [0] * 22], dtype=torch.int32)},
            InputError,
            r"up\.shira_indices: position 21 is \(12, 0\), outside the \[12, 10\] weight",
        ),
        (None, {KEY: torch.full((2, 22), 0.5)}, InputError, r"up\.shira_indices: indices are not whole numbers"),
        (
            {"mask_type": "custom"},
            {KEY: None},
            InputError,
            r"has no base_model\.model\.up\.shira_indices, and mask_type='custom' is not a mask .* can redraw",
        ),
        ({"r": 5}, None, InputError, r"r=5 gives 'down' 80 SHiRA entries, more than its 48 weights"),
        ({"bias": "all"}, None, UnsupportedError, r"fields peftc does not know .*bias='all'"),
    ],
    ids=["values-shape", "indices-shape", "indices-range", "indices-fractional", "no-indices", "rank", "bias"],
)
def test_refusals_name_the_cause(tmp_path, adapter, program, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(
            edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), ir.module_table(program)
        )


def test_gpt2_conv1d_is_refused(tmp_path):
    from transformers.pytorch_utils import Conv1D

    table = ir.module_table(export(models.Single(Conv1D(4, 6)).eval(), parse_inputs(["x:batch,6:float32"])))
    path = tmp_path / "a"
    path.mkdir()
    (path / "adapter_config.json").write_text('{"peft_type": "SHIRA", "target_modules": ["layer"], "r": 1}')
    from safetensors.torch import save_file

    save_file({"base_model.model.layer.shira_weight": torch.ones(10)}, path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"SHiRA on Conv1D \(module 'layer'\) is not supported"):
        load_adapter(path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_transposed_positions_fail_verification(adapter, monkeypatch):
    """Reading the positions column-major (``col·d_out + row``) instead of row-major must not pass."""
    assert check_against_peft(layers(), adapter, INPUTS).passed
    real = shira_ops.add_sparse

    def column_major(weight, flat, values):
        rows, columns = flat // weight.shape[1], flat % weight.shape[1]
        return real(weight, (columns * weight.shape[0] + rows) % weight.numel(), values)

    monkeypatch.setattr(shira_ops, "add_sparse", column_major)
    assert_caught(check_against_peft(layers(), adapter, INPUTS))
