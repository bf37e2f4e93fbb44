"""PVeRA: the site op against PEFT's own layers (projections saved and redrawn), the parser's
accounting of every key, refusals (``sample_at_inference`` among them), and a mutation that
verification catches. Merged and unmerged programs of real models are checked in the coverage matrix."""

from __future__ import annotations

import models
import pytest
import tiny_targets as tiny
import torch
from conftest import edited_adapter
from safetensors.torch import load_file

import peftc.methods.pvera as pvera
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.methods.loading import load_adapter


def _config(**kwargs):
    from peft import PveraConfig

    kwargs.setdefault("r", 3)
    return PveraConfig(target_modules=tiny.TARGETS, d_initial=1.0, **kwargs)


@pytest.mark.parametrize("config", [{}, {"save_projection": False, "projection_prng_key": 5}], ids=["saved", "redrawn"])
def test_sites_match_peft_layers(tmp_path, config):
    from peft import PeftModel

    path = models.make_adapter(tiny.mixed(), tmp_path / "a", _config(**config))
    parsed = load_adapter(path, module_table_from_module(tiny.mixed()))
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key for s in parsed.sites for t in s.tensors.values()}
    assert (used & keys) | {k for k, _ in parsed.unused} == keys  # every key accounted for
    assert any("redrawn" in w for w in parsed.warnings) == ("save_projection" in config)
    peft_model = PeftModel.from_pretrained(tiny.mixed(), str(path)).eval()
    generator = torch.Generator().manual_seed(2)
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        base = layer.get_base_layer()
        t = {role: entry.tensor for role, entry in site.tensors.items()}
        assert torch.equal(t["pvera_A"], layer.pvera_A["default"]) and torch.equal(
            t["pvera_B"], layer.pvera_B["default"]
        )
        with torch.no_grad():
            adapted = pvera.PVERA_WEIGHT.overload(base.weight, *t.values(), *site.scalars.values())
            assert tiny.rel(adapted - base.weight, layer.get_delta_weight("default")) < 1e-6, site.module
            x = torch.randn(4, layer.in_features, generator=generator)
            expected = layer(x)  # PEFT's unmerged forward: the mean of the learned distribution
            assert tiny.rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5
            assert tiny.rel(base(x), expected) > 0.05, f"{site.module}: the adapter barely changes the output"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(tiny.mixed(), tmp_path_factory.mktemp("pvera") / "a", _config())


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.mid.pvera_lambda_d": torch.ones(3)},
            InputError,
            r"mid\.pvera_lambda_d: shape \[3\] .* expected \[2r=6\] \(mean and log-variance\) for 'mid'",
        ),
        (
            None,
            {"base_model.pvera_A": torch.ones(3, 20)},
            InputError,
            r"base_model\.pvera_A: shape \[3, 20\] .* expected \[6, 20\] \(r=3; largest target d_in=20, d_out=20\)",
        ),
        (
            None,
            {"base_model.pvera_B": None},
            InputError,
            r"save_projection=true but the file has no base_model\.pvera_B",
        ),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected 'none', 'all' or 'pvera_only'"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["lambda-shape", "projection-shape", "projection-missing", "bias", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), tiny_table())


def tiny_table():
    return module_table_from_module(tiny.mixed())


def test_refuses_sampling_at_inference(tmp_path, adapter):
    """PEFT's forward then draws fresh noise on every call: no compiled model can reproduce it."""
    bad = edited_adapter(adapter, tmp_path / "bad", config={"sample_at_inference": True, "generator_seed": 3})
    with pytest.raises(
        UnsupportedError, match=r"sample_at_inference=True: PEFT's forward then adds fresh Gaussian noise"
    ):
        load_adapter(bad, tiny_table())


def test_mutation_log_variance_half_fails_verification(adapter, monkeypatch):
    """Reading the log-variance half of A and λ_d instead of the mean half must not pass."""
    assert tiny.verify_against_peft(adapter, merge=False).passed
    real = pvera.vera.delta_weight

    def second_half(pvera_a, pvera_b, lambda_b, lambda_d, d_out, d_in):
        r = lambda_d.shape[0] // 2
        return real(pvera_a[r:], pvera_b, lambda_b, lambda_d[r:], d_out, d_in)

    monkeypatch.setattr(pvera, "delta_weight", second_half)
    assert not tiny.verify_against_peft(adapter, merge=False).passed
