"""FRoD: the site op and U against PEFT's own layers (nn.Linear and Conv1D), the parser against
PEFT's files (projections saved, or rebuilt as PEFT rebuilds them), refusals (a stack that changes
the base weight first), and a mutation that verification must catch."""

from __future__ import annotations

from pathlib import Path

import models
import pytest
import torch
from conftest import adapt, edited_adapter, export
from layer_checks import peft_layers, rel, verify_against_peft
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc.methods.frod as frod_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.frod import FROD_WEIGHT, basis_factor
from peftc.methods.loading import load_adapter


class Mixed(nn.Module):
    """An ``nn.Linear`` (more outputs than inputs) and a GPT-2 ``Conv1D`` (fewer: W V⁻ᵀ has near-null columns,
    which only float64 reproduces)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 24)
        self.mid = Conv1D(12, 24)  # weight [24, 12]: d_in 24, d_out 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mid(torch.tanh(self.up(x)))


INPUTS = ["x:batch,6:float32"]


def mixed() -> nn.Module:
    torch.manual_seed(0)
    return Mixed().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import FrodConfig

    kwargs.setdefault("sparse_rate", 0.2)
    return FrodConfig(target_modules=["up", "mid"], fan_in_fan_out=True, progressbar=False, **kwargs)


def test_op_and_u_match_peft_layers():
    peft_model, merged = peft_layers(mixed(), _config())
    for name in ("up", "mid"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        layout = "linear_t" if isinstance(base, Conv1D) else "linear"
        u, v, _, lam = layer._get_frod_tensors("default", device=torch.device("cpu"), dtype=torch.float32)
        weight = base.weight.T if layout == "linear_t" else base.weight
        assert torch.equal(basis_factor(weight, v), u), name  # float64 then fp32, bitwise as PEFT
        with torch.no_grad():
            indices, values = layer.frod_s_indices["default"], layer.frod_lambda_s_values["default"]
            adapted = FROD_WEIGHT.overload(base.weight, u, v, indices, values, lam, layout)
            assert rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, 2, weight.shape[1], generator=torch.Generator().manual_seed(2))
            expected = layer(x)  # PEFT's unmerged forward: x V (Sᵀ + diag λ) Uᵀ
            assert rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_repeated_sparse_positions_add_up():
    dense = frod_ops.sparse(torch.tensor([[0, 1, 0], [1, 0, 1]]), torch.tensor([1.0, 2.0, 3.0]), 2)
    assert torch.equal(dense, torch.tensor([[0.0, 4.0], [2.0, 0.0]]))


def test_every_key_is_used(tmp_path):
    path = models.make_adapter(mixed(), tmp_path / "a", _config())
    parsed = load_adapter(path, ir.module_table(export(mixed(), parse_inputs(INPUTS))))
    used = {t.key.removesuffix(" as int64") for s in parsed.sites for t in s.tensors.values()}
    keys = set(load_file(path / "adapter_model.safetensors"))
    assert used & keys | {k for k, _ in parsed.unused} == keys
    assert {k for k, _ in parsed.unused} == {"base_model.frod_s_size.up", "base_model.frod_s_size.mid"}
    assert any("fan_in_fan_out=True but 'up' is a Linear" in w for w in parsed.warnings)


@pytest.mark.filterwarnings("ignore:Specified to not load FRoD projection")
def test_projections_rebuilt_without_save_projection_match_peft(tmp_path):
    """save_projection=false: V (QR/eigh for 'up', SVD for 'mid') and positions as PEFT rebuilds them."""
    from peft import PeftModel

    path = models.make_adapter(mixed(), tmp_path / "a", _config(save_projection=False, projection_prng_key=5))
    parsed = load_adapter(path, ir.module_table(export(mixed(), parse_inputs(INPUTS))))
    assert any("rebuilt from the base weights" in w for w in parsed.warnings)
    frod = PeftModel.from_pretrained(mixed(), str(path)).base_model
    for site in parsed.sites:
        assert torch.equal(site.tensors["frod_V"].tensor, frod.frod_V[site.module]["default"]), site.module
        assert torch.equal(site.tensors["frod_s_indices"].tensor, frod.frod_s_indices[site.module]["default"])
    assert verify_against_peft(mixed(), path, INPUTS, merge=False).passed


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mixed(), tmp_path_factory.mktemp("frod") / "a", _config())


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mixed(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.frod_V.up": None},
            InputError,
            r"save_projection=true but the file has no base_model\.frod_V\.up",
        ),
        (
            None,
            {"base_model.frod_V.up": torch.eye(5)},
            InputError,
            r"frod_V\.up: shape \[5, 5\] .* expected \[6, 6\] \(the inputs of category 'up'\)",
        ),
        (
            None,
            {"base_model.frod_s_indices.up": torch.tensor([[0, 6], [1, 2]])},
            InputError,
            r"frod_s_indices\.up: positions outside \[0, 6\)",
        ),
        (None, {"base_model.frod_s_size.up": torch.tensor([6, 5])}, InputError, r"frod_s_size\.up: \[6, 5\]; expected"),
        (
            None,
            {"base_model.model.up.frod_lambda_s_values": torch.ones(3)},
            InputError,
            r"up\.frod_lambda_s_values: shape \[3\] .* expected \[7\] .*7 sparse entries",
        ),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected one of 'none', 'all', 'frod_only'"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["V-missing", "V-shape", "positions", "size", "values", "bias", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


def test_an_earlier_adapter_on_the_module_is_refused(tmp_path, adapter):
    """U comes from the base weight; PEFT would derive it from the weight an earlier adapter leaves."""
    from peft import LoraConfig

    lora = models.make_adapter(mixed(), tmp_path / "lora", LoraConfig(target_modules=["up"]))
    program = export(mixed(), parse_inputs(INPUTS))
    with pytest.raises(
        UnsupportedError, match=r"adapter 'a' on 'up': FRoD's U is derived .* 'lora' adapts that module"
    ):
        adapt(program, lora, adapter)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_sparse_part_transposed_fails_verification(adapter, monkeypatch):
    """Placing the sparse values at (column, row) must not pass, merged or not."""
    assert verify_against_peft(mixed(), adapter, INPUTS, merge=True).passed
    real = frod_ops.sparse
    monkeypatch.setattr(frod_ops, "sparse", lambda indices, values, size: real(indices, values, size).T)
    for merge in (True, False):
        report = verify_against_peft(mixed(), adapter, INPUTS, merge=merge)
        assert not report.passed
        assert "vs peft" in str(report.error())
