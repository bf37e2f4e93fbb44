"""RandLoRA: the site op against PEFT's own layers (bases saved, and redrawn dense, sparse and very
sparse), the parser's accounting of every key, refusals, and a mutation that verification catches.
Merged and unmerged programs of real models are checked in the coverage matrix."""

from __future__ import annotations

import json

import models
import pytest
import tiny_targets as tiny
import torch
from conftest import edited_adapter
from safetensors.torch import load_file, save_file
from torch import nn

import peftc.methods.randlora as randlora
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.methods.loading import load_adapter


def _config(**kwargs):
    from peft import RandLoraConfig

    kwargs.setdefault("r", 3)  # min(12, 5) = 5 → 2 bases ≠ r: the (r, bases) pairing matters
    return RandLoraConfig(target_modules=tiny.TARGETS, randlora_alpha=6, **kwargs)


def _peft(path):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny.mixed(), str(path)).eval()


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"save_projection": False},
        {"save_projection": False, "sparse": True},
        {"save_projection": False, "very_sparse": True, "r": 4},
    ],
    ids=["saved", "redrawn", "redrawn-sparse", "redrawn-very-sparse"],
)
def test_sites_match_peft_layers(tmp_path, config):
    path = models.make_adapter(tiny.mixed(), tmp_path / "a", _config(**config))
    parsed = load_adapter(path, module_table_from_module(tiny.mixed()))
    peft_model = _peft(path)
    assert [s.module for s in parsed.sites] == sorted(tiny.TARGETS)
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key for s in parsed.sites for t in s.tensors.values()}
    assert (used & keys) | {k for k, _ in parsed.unused} == keys  # every key accounted for
    assert any("redrawn" in w for w in parsed.warnings) == ("save_projection" in config)
    generator = torch.Generator().manual_seed(2)
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        base = layer.get_base_layer()
        t = {role: entry.tensor for role, entry in site.tensors.items()}
        assert torch.equal(t["randlora_A"], layer.randlora_A["default"])  # the same bases, bit for bit
        assert torch.equal(t["randlora_B"], layer.randlora_B["default"])
        with torch.no_grad():
            adapted = randlora.RANDLORA_WEIGHT.overload(base.weight, *t.values(), *site.scalars.values())
            assert tiny.rel(adapted - base.weight, layer.get_delta_weight("default")) < 1e-6, site.module
            x = torch.randn(4, layer.in_features, generator=generator)
            expected = layer(x)  # PEFT's unmerged forward
            assert tiny.rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5
            assert tiny.rel(base(x), expected) > 0.05, f"{site.module}: the adapter barely changes the output"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(tiny.mixed(), tmp_path_factory.mktemp("randlora") / "a", _config())


@pytest.fixture(scope="module")
def table():
    return module_table_from_module(tiny.mixed())


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.down.randlora_lambda": torch.ones(3, 3)},
            InputError,
            r"down\.randlora_lambda: shape \[3, 3\] .* expected \[r=3, bases=2\] for 'down'",
        ),
        (
            None,
            {"base_model.model.mid.randlora_gamma": torch.ones(4, 20)},
            InputError,
            r"mid\.randlora_gamma: shape \[4, 20\] .* expected \[bases=4, min\(d_in, d_out\)\] for 'mid'",
        ),
        (
            None,
            {"base_model.randlora_B": torch.ones(20, 4, 3)},
            InputError,
            r"base_model\.randlora_B: shape \[20, 4, 3\] .* expected \[20, 7, 3\] \(r=3; largest target d_in=20",
        ),
        (
            None,
            {"base_model.randlora_A": None},
            InputError,
            r"save_projection=true but the file has no base_model\.randlora_A",
        ),
        (
            None,
            {"base_model.model.up.randlora_A": torch.zeros(3, 1, 20)},
            InputError,
            r"up\.randlora_A: differs from base_model\.randlora_A, the shared basis it copies",
        ),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected 'none', 'all' or 'randlora_only'"),
        ({"r": 0}, None, InputError, r"r=0; give an integer >= 1"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=[
        "lambda-shape",
        "gamma-shape",
        "basis-shape",
        "basis-missing",
        "copy-differs",
        "bias",
        "rank",
        "unknown-field",
    ],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


def test_refuses_a_convolution_target(tmp_path):
    path = tmp_path / "conv"
    path.mkdir()
    config = {"peft_type": "RANDLORA", "target_modules": ["conv"], "r": 2}
    (path / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    tensors = {
        "base_model.model.conv.randlora_lambda": torch.ones(2, 1),
        "base_model.model.conv.randlora_gamma": torch.ones(1, 2),
    }
    save_file(tensors, path / "adapter_model.safetensors")
    table = module_table_from_module(_conv())
    with pytest.raises(UnsupportedError, match=r"RandLoRA on Conv2d \(module 'conv'\) is not supported"):
        load_adapter(path, table)


def _conv() -> nn.Module:
    module = nn.Module()
    module.conv = nn.Conv2d(2, 3, 1)
    return module


def test_mutation_flattening_the_same_way_fails_verification(adapter, monkeypatch):
    """Pairing the (r, bases) axes of both bases in the same order (the 'natural' reading) must not pass."""
    assert tiny.verify_against_peft(adapter, merge=True).passed

    def same_order(basis_a, basis_b, lam, gamma, scale, d_out, d_in):
        small, large, bases = min(d_in, d_out), max(d_in, d_out), lam.shape[1]
        update_a = (lam[:, :, None] * basis_a[:, :bases, :small] * gamma[None]).flatten(0, 1)
        update_b = basis_b[:large, :bases, :].transpose(1, 2).flatten(1)
        delta = update_b @ update_a if small == d_in else update_a.T @ update_b.T
        return delta * scale

    monkeypatch.setattr(randlora, "delta_weight", same_order)
    assert not tiny.verify_against_peft(adapter, merge=True).passed
