"""The traced generation step of a GQA model attends on its key/value heads (``peftc/loaders/grouped.py``):
no copy of the cache per query head, numerics of PEFT's own step (stock transformers attention), and a
bf16 AOTInductor package's caches kept in bf16 between decode steps (``decode.native_step``)."""

from __future__ import annotations

import copy
import warnings

import models
import numpy as np
import pytest
import torch

from peftc import ir
from peftc.generation import decode
from peftc.loaders import causal, grouped

KV_HEADS = 2


def _llama() -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=KV_HEADS,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return models._seeded(lambda: transformers.LlamaForCausalLM(config))


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """(traced step of the LoRA-merged model, PEFT's model of the same step)."""
    from peft import PeftModel

    model = _llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    adapter = models.make_lora(model, tmp_path_factory.mktemp("gqa") / "lora", target_modules=targets, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = copy.deepcopy(model)
        causal.attach(oracle, causal.TEXT_GENERATION)
        peft_model = PeftModel.from_pretrained(oracle, str(adapter)).eval()
        merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload().eval()
    program = _traced(merged)
    assert merged.config._attn_implementation == "sdpa"  # the traced-only attention is not left behind
    return program, peft_model


def _traced(module: torch.nn.Module) -> ir.Program:
    """The step program of ``module`` (made a generation step in place), as compile traces it."""
    signature = causal.attach(module, causal.TEXT_GENERATION)
    return ir.trace(module, signature.example(signature.trace_sizes()), signature.dynamic_shapes())


def _feeds(batch: int, seq: int, past: int) -> dict[str, torch.Tensor]:
    """A left-padded step: row 0 has two padding columns."""
    generator = torch.Generator().manual_seed(past + seq)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, :2] = 0
    feeds = {
        "input_ids": torch.randint(3, 100, (batch, seq), generator=generator),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(1) - 1).clamp(min=0)[:, past:],
    }
    for layer in range(1):
        for name in (causal.key_name(layer), causal.value_name(layer)):
            feeds[name] = torch.randn(batch, KV_HEADS, past, 8, generator=generator)
    return feeds


def _worst(program: ir.Program, peft_model: torch.nn.Module) -> float:
    """Largest |artifact - PEFT| over the outputs of a padded prefill and a decode step after 6 tokens."""
    worst = 0.0
    for feeds in (_feeds(2, 5, 0), _feeds(2, 1, 6)):
        with torch.no_grad():
            got, want = program.module()(**feeds), peft_model(**feeds)
        worst = max(worst, *((got[k] - want[k]).abs().max().item() for k in want))
    return worst


def test_sdpa_reads_the_cache_heads_without_a_repeat(step):
    program, _ = step
    attention = [n for n in program.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(attention) == 1
    for node in attention:
        query, key, value = node.args[:3]
        assert key.target is value.target is torch.ops.aten.cat.default  # the present.* tensors themselves
        assert key.meta["val"].shape[1] == value.meta["val"].shape[1] == KV_HEADS
        assert query.meta["val"].shape[1] == KV_HEADS  # the query's heads grouped per key/value head
    assert not [n for n in program.graph.nodes if n.target is torch.ops.aten.expand.default]


def test_grouped_step_matches_peft_step(step):
    program, peft_model = step
    assert _worst(program, peft_model) < 1e-5


def _against_transformers() -> float:
    """Largest |grouped - transformers' sdpa attention| on a left-padded prefill of 5 tokens after 3."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = torch.nn.Module()
    layer.num_key_value_groups, layer.is_causal = 2, True
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 8, generator=generator)
    key, value = (torch.randn(2, KV_HEADS, 8, 8, generator=generator) for _ in range(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0
    additive = causal.step_mask(mask, 5, torch.float32)
    got, _ = grouped.grouped_sdpa(layer, query, key, value, additive, scaling=0.5)
    want, _ = sdpa_attention_forward(layer, query, key, value, additive, scaling=0.5)
    return (got - want).abs().max().item()


def test_grouped_attention_equals_transformers_attention():
    assert _against_transformers() < 1e-6


def test_mask_rows_tiled_per_token_instead_of_per_group_are_caught(monkeypatch):
    monkeypatch.setattr(grouped, "tiled", lambda mask, groups: mask.repeat_interleave(groups, dim=2))
    assert _against_transformers() > 1e-2


def test_native_step_passes_package_caches_on_untouched():
    seen = {}
    present = torch.randn(1, 2, 4, 8).to(torch.bfloat16)

    def run_tensors(feeds):
        seen.update(feeds)
        return {"logits": torch.randn(1, 3, 10).to(torch.bfloat16), "present.0.key": present}

    cache = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    out = decode.native_step(run_tensors, {"input_ids": np.array([[5]]), causal.key_name(0): cache})
    assert seen[causal.key_name(0)] is cache and seen["input_ids"].dtype == torch.int64
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (1, 1, 10)
    assert decode._next_pasts(out, {causal.key_name(0): None})[causal.key_name(0)] is present
