"""GraLoRA: the site op against PEFT's own layers (nn.Linear and Conv1D, with and without the hybrid
term), the block structure written out, the parser against PEFT's files, refusals, and a mutation
that verification must catch."""

from __future__ import annotations

from pathlib import Path

import models
import pytest
import torch
from conftest import edited_adapter, export
from layer_checks import peft_layers, rel, verify_against_peft
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc.methods.gralora as gralora_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.gralora import GRALORA_WEIGHT
from peftc.methods.loading import load_adapter


class Mixed(nn.Module):
    """An ``nn.Linear`` and a GPT-2 ``Conv1D`` (weight ``[d_in, d_out]``) target."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 24)
        self.mid = Conv1D(12, 24)  # weight [24, 12]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mid(torch.tanh(self.up(x)))


INPUTS = ["x:batch,8:float32"]


def mixed() -> nn.Module:
    torch.manual_seed(0)
    return Mixed().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import GraloraConfig

    kwargs.setdefault("r", 4)
    kwargs.setdefault("alpha", 6)
    return GraloraConfig(target_modules=["up", "mid"], **kwargs)


@pytest.mark.parametrize(("k", "r", "hybrid"), [(2, 4, 0), (4, 8, 3)])
def test_op_matches_peft_layers(k, r, hybrid):
    peft_model, merged = peft_layers(mixed(), _config(gralora_k=k, r=r, hybrid_r=hybrid))
    for name in ("up", "mid"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        general = [layer.gralora_A_general["default"], layer.gralora_B_general["default"]]
        general = [g.weight for g in general] if hybrid else [None, None]
        tensors = (layer.gralora_A["default"], layer.gralora_B["default"], *general)
        layout = "linear_t" if isinstance(base, Conv1D) else "linear"
        with torch.no_grad():
            adapted = GRALORA_WEIGHT.overload(base.weight, *tensors, layer.scaling["default"], layout)
            assert rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            for shape in ((3, layer.in_features), (2, 5, layer.in_features)):  # PEFT's 2-D and 3-D paths
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
                expected = layer(x)  # PEFT's unmerged forward: block products on the activations
                assert rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
                assert rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_block_pairs_written_out():
    """k=2, r=2 (σ=1): block (n, j) of ΔWᵀ is A[n,:,j]·B[j,n,:] (an outer product), for all four pairs."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 2, generator=g), torch.randn(2, 2, 5, generator=g)
    expected = torch.zeros(6, 10)  # ΔWᵀ [d_in, d_out]
    for n in range(2):
        for j in range(2):
            expected[3 * n : 3 * n + 3, 5 * j : 5 * j + 5] = torch.outer(a[n, :, j], b[j, n, :])
    assert rel(gralora_ops.delta_weight(a, b, None, None), expected.T) < 1e-6


def test_every_key_is_a_site_tensor(tmp_path):
    path = models.make_adapter(mixed(), tmp_path / "a", _config(hybrid_r=2, fan_in_fan_out=True))
    parsed = load_adapter(path, ir.module_table(export(mixed(), parse_inputs(INPUTS))))
    assert {s.module: s.scalars["layout"] for s in parsed.sites} == {"up": "linear", "mid": "linear_t"}
    assert {s.scalars["scale"] for s in parsed.sites} == {1.0}  # α / (r + hybrid_r) = 6 / 6
    assert any("fan_in_fan_out=True but 'up' is a Linear" in w for w in parsed.warnings)
    used = {t.key for s in parsed.sites for t in s.tensors.values() if t is not None}
    assert used == set(load_file(path / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mixed(), tmp_path_factory.mktemp("gralora") / "a", _config(fan_in_fan_out=True))


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mixed(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            {"gralora_k": 4, "r": 8},
            None,
            InputError,
            r"mid\.gralora_A: shape \[2, 12, 4\] .* expected \[4, 6, 8\] for 'mid' \(weight \[24, 12\]\), r=8",
        ),
        (
            {"hybrid_r": 2},
            None,
            InputError,
            r"module 'mid' has no gralora_A_general",
        ),
        (
            None,
            {"base_model.model.up.gralora_A_general.weight": torch.ones(2, 8)},
            InputError,
            r"up\.gralora_A_general\.weight: hybrid_r=0, so PEFT creates no hybrid factors",
        ),
        ({"r": 3}, None, InputError, r"r=3, gralora_k=2, hybrid_r=0: .*r a multiple of gralora_k"),
        (
            {"gralora_k": 5, "r": 5},
            None,
            InputError,
            r"gralora_k=5 does not divide the 24 inputs and 12 outputs of 'mid'",
        ),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected one of 'none', 'all', 'gralora_only'"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["k-shape", "hybrid-missing", "hybrid-extra", "r-multiple", "k-divides", "bias", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


class Convolutional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv1d(8, 24, 1)
        self.mid = Conv1D(12, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mid(self.up(x).transpose(1, 2).contiguous())


def test_convolution_target_is_refused_as_peft_does(tmp_path, adapter):
    table = ir.module_table(export(Convolutional().eval(), parse_inputs(["x:batch,8,3:float32"])))
    with pytest.raises(UnsupportedError, match=r"GraLoRA on Conv1d \(module 'up'\) is not supported"):
        load_adapter(adapter, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_blocks_paired_the_wrong_way_fails_verification(adapter, monkeypatch):
    """Reading A's runs by input block instead of output block (A[j,i,n,·]) must not pass."""
    assert verify_against_peft(mixed(), adapter, INPUTS, merge=True).passed

    def swapped(a, b, a_general, b_general):
        k, block_in, r = a.shape
        a4 = a.reshape(k, block_in, k, r // k).permute(2, 1, 0, 3)  # n and j exchanged
        b4 = b.reshape(k, k, r // k, -1)
        return torch.einsum("nijs,jnso->nijo", a4.float(), b4.float()).reshape(k * block_in, -1).T

    monkeypatch.setattr(gralora_ops, "delta_weight", swapped)
    for merge in (True, False):
        report = verify_against_peft(mixed(), adapter, INPUTS, merge=merge)
        assert not report.passed
        assert "vs peft" in str(report.error())
