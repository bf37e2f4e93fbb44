"""VB-LoRA: the site op against PEFT's own layers (full logits and ``save_only_topk_weights``), the
parser's accounting of every key, refusals, and a mutation that verification catches. Merged and
unmerged programs of real models (and the ONNX lowering of ``topk``) are checked in the coverage matrix."""

from __future__ import annotations

import models
import pytest
import tiny_targets as tiny
import torch
from conftest import edited_adapter
from safetensors.torch import load_file

import peftc.methods.vblora as vblora
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.methods.loading import load_adapter

SIZES = (8, 16, 8, 4)  # vector_length=4 divides every size


def _config(**kwargs):
    from peft import VBLoRAConfig

    return VBLoRAConfig(r=2, num_vectors=6, vector_length=4, target_modules=tiny.TARGETS, **kwargs)


@pytest.mark.parametrize(
    "config",
    [{}, {"save_only_topk_weights": True}, {"save_only_topk_weights": True, "topk": 3}],
    ids=["logits", "topk-only", "topk-only-k3"],
)
def test_sites_match_peft_layers(tmp_path, config):
    from peft import PeftModel

    path = models.make_adapter(tiny.mixed(SIZES), tmp_path / "a", _config(**config), noise=1.0)
    parsed = load_adapter(path, module_table_from_module(tiny.mixed(SIZES)))
    peft_model = PeftModel.from_pretrained(tiny.mixed(SIZES), str(path)).eval()
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {k for s in parsed.sites for t in s.tensors.values() for k in t.key.split(" (")[0].split(" & ")}
    assert used | {k for k, _ in parsed.unused} == keys  # every key accounted for
    generator = torch.Generator().manual_seed(2)
    for site in parsed.sites:
        layer = peft_model.base_model.model.get_submodule(site.module)
        base = layer.get_base_layer()
        t = [entry.tensor for entry in site.tensors.values()]
        with torch.no_grad():
            adapted = vblora.VBLORA_WEIGHT.overload(base.weight, *t, *site.scalars.values())
            assert tiny.rel(adapted - base.weight, layer.get_delta_weight("default")) < 1e-6, site.module
            x = torch.randn(4, layer.in_features, generator=generator)
            expected = layer(x)  # PEFT's unmerged forward
            assert tiny.rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5
            assert tiny.rel(base(x), expected) > 0.05, f"{site.module}: the adapter barely changes the output"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("vblora")
    return {
        "logits": models.make_adapter(tiny.mixed(SIZES), root / "logits", _config(), noise=1.0),
        "topk": models.make_adapter(tiny.mixed(SIZES), root / "topk", _config(save_only_topk_weights=True)),
    }


@pytest.mark.parametrize(
    ("kind", "config", "tensors", "error", "match"),
    [
        ("logits", None, {"base_model.vblora_vector_bank": None}, InputError, r"no base_model\.vblora_vector_bank"),
        (
            "logits",
            None,
            {"base_model.vblora_vector_bank": torch.ones(6, 8)},
            InputError,
            r"vblora_vector_bank: shape \[6, 8\] .* expected \[num_vectors=6, vector_length=4\]",
        ),
        (
            "logits",
            None,
            {"base_model.model.mid.vblora_logits_B": torch.ones(4, 2, 6)},
            InputError,
            r"mid\.vblora_logits_B: shape \[4, 2, 6\] .* expected \[2, 2, 6\] for 'mid'",
        ),
        ("logits", {"topk": 7}, None, InputError, r"topk=7 but num_vectors=6; topk picks among the bank's vectors"),
        (
            "logits",
            {"bias": "lora_only"},
            None,
            InputError,
            r"bias='lora_only'; expected 'none', 'all' or 'vblora_only'",
        ),
        ("logits", {"use_dora": True}, None, UnsupportedError, r"fields peftc does not know .*use_dora"),
        (
            "topk",
            None,
            {"base_model.model.up.vblora_logits_A_topk_indices": torch.full((2, 2, 2), 6, dtype=torch.uint8)},
            InputError,
            r"up\.vblora_logits_A_topk_indices: an index outside the bank of num_vectors=6",
        ),
        (
            "topk",
            None,
            {"base_model.model.up.vblora_logits_A_topk_indices": torch.zeros(2, 2, 2)},
            InputError,
            r"up\.vblora_logits_A_topk_indices: dtype torch\.float32; top-k indices are integers",
        ),
        (
            "topk",
            None,
            {"base_model.model.down.vblora_logits_B_topk_weights": None},
            InputError,
            r"module 'down' has no B_weights",
        ),
    ],
    ids=[
        "bank-missing",
        "bank-shape",
        "logits-shape",
        "topk",
        "bias",
        "unknown-field",
        "index",
        "index-dtype",
        "weights",
    ],
)
def test_refusals_name_the_cause(tmp_path, adapters, kind, config, tensors, error, match):
    bad = edited_adapter(adapters[kind], tmp_path / "bad", config=config, tensors=tensors)
    with pytest.raises(error, match=match):
        load_adapter(bad, module_table_from_module(tiny.mixed(SIZES)))


def test_refuses_a_vector_length_that_does_not_divide_a_module(adapters):
    with pytest.raises(InputError, match=r"vector_length=4 does not divide module 'down' \(d_in=8, d_out=5\)"):
        load_adapter(adapters["logits"], module_table_from_module(tiny.mixed((8, 16, 8, 5))))


def test_mutation_factor_b_read_without_its_transpose_fails_verification(adapters, monkeypatch):
    """Reading B's ``[d_out/L, r, L]`` mix as ``[d_out, r]`` without PEFT's transpose must not pass."""
    assert tiny.verify_against_peft(adapters["logits"], merge=True, sizes=SIZES).passed

    def untransposed(bank, logits_a, logits_b, topk):
        a = vblora.mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
        return vblora.mix(logits_b, bank, topk).reshape(-1, logits_b.shape[1]) @ a

    monkeypatch.setattr(vblora, "delta_weight", untransposed)
    assert not tiny.verify_against_peft(adapters["logits"], merge=True, sizes=SIZES).passed
