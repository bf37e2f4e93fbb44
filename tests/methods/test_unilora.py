"""UniLoRA: the site op against PEFT's own layers (indices saved, and dealt again from ``proj_seed`` in
PEFT's module order, which is not the order the modules run in), the parser's accounting of every
key, refusals, and a mutation that verification catches. Merged and unmerged programs of real models
are checked in the coverage matrix."""

from __future__ import annotations

import models
import pytest
import tiny_targets as tiny
import torch
from conftest import edited_adapter, export
from safetensors.torch import load_file
from torch import nn

import peftc.methods.model_order as model_order
import peftc.methods.unilora as unilora
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter


class DeclaredBackwards(nn.Module):
    """``down`` is declared first and runs last: PEFT deals indices in declaration order."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(12, 5)
        self.up = nn.Linear(6, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def backwards() -> nn.Module:
    torch.manual_seed(0)
    return DeclaredBackwards().eval().requires_grad_(False)


def _config(targets=tiny.TARGETS, **kwargs):
    from peft import UniLoraConfig

    return UniLoraConfig(target_modules=targets, **{"theta_d_length": 16, "r": 2, **kwargs})


def _check_sites(parsed, peft_model):
    generator = torch.Generator().manual_seed(2)
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        base = layer.get_base_layer()
        t = {role: entry.tensor for role, entry in site.tensors.items()}
        for role in ("indices_A", "indices_B", "scales_A", "scales_B"):
            assert torch.equal(t[f"unilora_{role}"], getattr(layer, f"unilora_{role}")["default"]), (site.module, role)
        with torch.no_grad():
            adapted = unilora.UNILORA_WEIGHT.overload(base.weight, *t.values(), *site.scalars.values())
            assert tiny.rel(adapted - base.weight, layer.get_delta_weight("default")) < 1e-6, site.module
            x = torch.randn(4, layer.in_features, generator=generator)
            expected = layer(x)  # PEFT's unmerged forward
            assert tiny.rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5


@pytest.mark.parametrize(
    "config", [{}, {"save_indices": True}, {"theta_d_length": 7, "r": 3}], ids=["dealt", "saved", "dealt-uneven"]
)
def test_sites_match_peft_layers(tmp_path, config):
    from peft import PeftModel

    path = models.make_adapter(tiny.mixed(), tmp_path / "a", _config(**config), noise=3.0)
    parsed = load_adapter(path, module_table_from_module(tiny.mixed()))
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key for s in parsed.sites for t in s.tensors.values()}
    assert (used & keys) | {k for k, _ in parsed.unused} == keys  # every key accounted for
    _check_sites(parsed, PeftModel.from_pretrained(tiny.mixed(), str(path)).eval())


def test_indices_are_dealt_in_declaration_order_not_call_order(tmp_path):
    from peft import PeftModel

    path = models.make_adapter(backwards(), tmp_path / "a", _config(["up", "down"]), noise=3.0)
    parsed = load_adapter(path, ir.module_table(export(backwards(), parse_inputs(["x:batch,6:float32"]))))
    _check_sites(parsed, PeftModel.from_pretrained(backwards(), str(path)).eval())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("unilora")
    return {
        "dealt": models.make_adapter(tiny.mixed(), root / "dealt", _config(), noise=3.0),
        "saved": models.make_adapter(tiny.mixed(), root / "saved", _config(save_indices=True), noise=3.0),
    }


@pytest.mark.parametrize(
    ("kind", "config", "tensors", "error", "match"),
    [
        ("saved", None, {"base_model.unilora_theta_d": None}, InputError, r"no base_model\.unilora_theta_d"),
        (
            "dealt",
            None,
            {"base_model.unilora_theta_d": torch.ones(8)},
            InputError,
            r"unilora_theta_d: shape \[8\] .* expected \[theta_d_length=16\]",
        ),
        (
            "saved",
            None,
            {"base_model.model.mid.unilora_indices_B": torch.zeros(2, 12, dtype=torch.int64)},
            InputError,
            r"mid\.unilora_indices_B: shape \[2, 12\] .* expected \[12, 2\] \(d_out, r\) for 'mid'",
        ),
        (
            "saved",
            None,
            {"base_model.model.up.unilora_indices_A": torch.full((2, 6), 16, dtype=torch.int64)},
            InputError,
            r"up\.unilora_indices_A: an index outside theta_d of length 16",
        ),
        (
            "saved",
            None,
            {"base_model.model.up.unilora_indices_A": torch.zeros(2, 6)},
            InputError,
            r"up\.unilora_indices_A: dtype fp32; indices are integers",
        ),
        ("saved", None, {"base_model.model.down.unilora_scales_A": None}, InputError, r"module 'down' has no scales_A"),
        (
            "dealt",
            {"bias": "lora_only"},
            None,
            InputError,
            r"bias='lora_only'; expected 'none', 'all' or 'unilora_only'",
        ),
        ("dealt", {"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=[
        "theta-missing",
        "theta-shape",
        "indices-shape",
        "index-range",
        "index-dtype",
        "scales-missing",
        "bias",
        "field",
    ],
)
def test_refusals_name_the_cause(tmp_path, adapters, kind, config, tensors, error, match):
    bad = edited_adapter(adapters[kind], tmp_path / "bad", config=config, tensors=tensors)
    with pytest.raises(error, match=match):
        load_adapter(bad, module_table_from_module(tiny.mixed()))


def test_saved_indices_that_peft_ignores_are_recorded_unused(tmp_path, adapters):
    edited = edited_adapter(adapters["saved"], tmp_path / "a", config={"save_indices": False})
    parsed = load_adapter(edited, module_table_from_module(tiny.mixed()))
    assert len(parsed.unused) == 12 and all("save_indices=false" in why for _, why in parsed.unused)


class Spare(tiny.Mixed):
    """A targeted layer the forward never calls: PEFT adapts it and deals it indices all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(6, 4)


def test_refuses_dealing_indices_past_a_target_that_does_not_run(tmp_path):
    path = models.make_adapter(Spare().eval(), tmp_path / "a", _config([*tiny.TARGETS, "spare"]))
    table = ir.module_table(export(Spare().eval(), parse_inputs(tiny.INPUTS)))
    with pytest.raises(UnsupportedError, match=r"module 'spare' is targeted but does not run in the traced program"):
        load_adapter(path, table)


def test_mutation_dealing_in_name_order_fails_verification(tmp_path, monkeypatch):
    """Dealing the stream to modules sorted by name instead of in declaration order must not pass."""
    path = models.make_adapter(tiny.mixed(), tmp_path / "a", _config(), noise=3.0)
    assert tiny.verify_against_peft(path, merge=True).passed
    monkeypatch.setattr(model_order, "declaration_order", lambda modules, paths: sorted(paths))
    assert not tiny.verify_against_peft(path, merge=True).passed
