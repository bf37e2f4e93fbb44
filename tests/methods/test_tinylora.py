"""TinyLoRA: the site op against PEFT's own layers (linear, ``Conv1D`` and embedding targets; ``v``
tied across modules in PEFT's module order; projections saved and drawn again), the parser's
accounting of every key, refusals, and a mutation that verification catches. Merged and unmerged
programs of real models are checked in the coverage matrix."""

from __future__ import annotations

import models
import pytest
import tiny_targets as tiny
import torch
from conftest import edited_adapter, export
from safetensors.torch import load_file
from torch import nn

import peftc.methods.tinylora as tinylora
from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter

TARGETS = [*tiny.TARGETS, "emb"]


class Embedded(tiny.Mixed):
    """The three targets behind a token embedding, declared last (so numbered last by PEFT)."""

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, max_norm=max_norm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.emb(ids))


def embedded(max_norm: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    return Embedded(max_norm).eval().requires_grad_(False)


def _config(**kwargs):
    from peft import TinyLoraConfig

    return TinyLoraConfig(target_modules=TARGETS, **{"r": 2, "u": 3, **kwargs})


@pytest.mark.parametrize(
    "config",
    [{}, {"weight_tying": 0.5}, {"weight_tying": 1.0, "save_projection": False}, {"r": 8, "weight_tying": 0.3}],
    ids=["untied", "tied-pairs", "tied-all-redrawn", "rank-capped"],
)
def test_sites_match_peft_layers(tmp_path, config):
    from peft import PeftModel

    path = models.make_adapter(embedded(), tmp_path / "a", _config(**config), noise=1.0)
    parsed = load_adapter(path, module_table_from_module(embedded()))
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key for s in parsed.sites for t in s.tensors.values()}
    assert (used & keys) | {k for k, _ in parsed.unused} | {r.tensor.key for r in parsed.replacements} == keys
    peft_model = PeftModel.from_pretrained(embedded(), str(path)).eval()
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        base = layer.get_base_layer()
        assert site.info["group"] == int(layer._tinylora_v_key["default"]), site.module  # the v PEFT reads
        t = {role: entry.tensor for role, entry in site.tensors.items()}
        assert torch.equal(t["tinylora_P"], layer.tinylora_P["default"]), site.module
        with torch.no_grad():
            adapted = tinylora.TINYLORA_WEIGHT.overload(base.weight, *t.values(), *site.scalars.values())
            assert tiny.rel(adapted - base.weight, layer.get_delta_weight("default")) < 1e-6, site.module
    ids = torch.tensor([[1, 4, 9], [0, 0, 7]])
    with torch.no_grad():  # PEFT's unmerged forward, embedding lookup included, against the adapted weights
        expected = peft_model(ids)
        adapted = {
            f"{s.module}.weight": tinylora.TINYLORA_WEIGHT.overload(
                embedded().get_submodule(s.module).weight, *(e.tensor for e in s.tensors.values()), s.scalars["layout"]
            )
            for s in parsed.sites
        }
        assert tiny.rel(torch.func.functional_call(embedded(), adapted, (ids,)), expected) < 1e-5
        assert tiny.rel(embedded()(ids), expected) > 0.02  # the adapter changes the output


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return models.make_adapter(embedded(), tmp_path_factory.mktemp("tinylora") / "a", _config(weight_tying=0.5))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (None, {"base_model.model.mid.tinylora_A": torch.ones(2, 12)}, InputError, r"mid\.tinylora_A: shape \[2, 12\] .* expected \[r=2, 20\] for 'mid'"),
        (None, {"base_model.model.emb.tinylora_B": torch.ones(6, 2)}, InputError, r"emb\.tinylora_B: shape \[6, 2\] .* expected \[10, r=2\] for 'emb'"),
        (None, {"base_model.model.up.tinylora_P": torch.ones(3, 3, 3)}, InputError, r"up\.tinylora_P: shape \[3, 3, 3\] .* expected \[u=3, r=2, r=2\]"),
        (None, {"base_model.tinylora_v.1": None}, InputError, r"no base_model\.tinylora_v\.1, the v of group 1 that 'down' reads"),
        (None, {"base_model.tinylora_v.0": torch.ones(4)}, InputError, r"tinylora_v\.0: shape \[4\] .* expected \[u=3\]"),
        ({"weight_tying": 1.5}, None, InputError, r"weight_tying=1\.5; it must lie in \[0, 1\]"),
        ({"u": 0}, None, InputError, r"u=0; give an integer >= 1"),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected 'none', 'all' or 'tinylora_only'"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["A-shape", "B-shape", "P-shape", "v-missing", "v-shape", "tying", "u", "bias", "unknown-field"],
)  # fmt: skip
def test_refusals_name_the_cause(tmp_path, adapter, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(
            edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors),
            module_table_from_module(embedded()),
        )


def test_refuses_an_embedding_with_max_norm(adapter):
    table = ir.module_table(export(embedded(max_norm=1.0), parse_inputs(["ids:batch,3:int64"])))
    with pytest.raises(UnsupportedError, match=r"TinyLoRA on embedding 'emb' with max_norm"):
        load_adapter(adapter, table)


class Spare(tiny.Mixed):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(6, 4)  # targeted, never called: PEFT still numbers it


def test_refuses_numbering_past_a_target_that_does_not_run(tmp_path):
    from peft import TinyLoraConfig

    config = TinyLoraConfig(r=2, u=3, target_modules=[*tiny.TARGETS, "spare"])
    path = models.make_adapter(Spare().eval(), tmp_path / "a", config)
    with pytest.raises(
        InputError, match=r"spare\.tinylora_A: maps to module 'spare', which the base model does not execute"
    ):
        load_adapter(path, ir.module_table(export(Spare().eval(), parse_inputs(tiny.INPUTS))))


def test_mutation_transposed_core_fails_verification(tmp_path, monkeypatch):
    """``B · Rᵀ · A`` instead of ``B · R · A`` must not pass."""
    from peft import TinyLoraConfig

    path = models.make_adapter(tiny.mixed(), tmp_path / "a", TinyLoraConfig(r=3, u=3, target_modules=tiny.TARGETS))
    assert tiny.verify_against_peft(path, merge=True).passed

    def transposed(a, b, p, v):
        return b @ (v[:, None, None] * p).sum(0).T @ a

    monkeypatch.setattr(tinylora, "delta_weight", transposed)
    assert not tiny.verify_against_peft(path, merge=True).passed
