"""``--task text2text-generation``: the encoder and decoder-step programs of T5 and BART against PEFT."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path

import models
import numpy as np
import pytest
import torch
from cli_run import error_line, run
from test_generate import _gpt2, _tokenizer

import peftc
from peftc.cli import main
from peftc.generation import seq2seq

NEW = 16


def _t5() -> torch.nn.Module:
    import transformers

    config = transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return models._seeded(lambda: transformers.T5ForConditionalGeneration(config))


def _bart() -> torch.nn.Module:
    import transformers

    config = transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.2,
    )  # fmt: skip
    return models._seeded(lambda: transformers.BartForConditionalGeneration(config))


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A T5 directory with a tokenizer, compiled by the plain CLI command (task inferred); LoRA on q/v
    of the encoder, the decoder's self-attention and its cross-attention."""
    root = tmp_path_factory.mktemp("gen-t5")
    model = _t5()
    model.save_pretrained(str(root / "base"))
    _tokenizer(root / "base")  # [PAD] 0, [EOS] 1: T5's pad and eos ids
    adapter = models.make_lora(model, root / "lora", target_modules=["q", "v"])
    assert main(["compile", str(root / "base"), "--adapter", str(adapter), "-o", str(root / "out")]) == 0
    return model, adapter, peftc.load(root / "out")


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """A BART module compiled from Python with the task named (a fresh module has no ``architectures``)."""
    root = tmp_path_factory.mktemp("gen-bart")
    model = _bart()
    adapter = models.make_lora(model, root / "lora", target_modules=["q_proj", "v_proj"], seed=2)
    peftc.compile(model, [adapter], out=root / "out", task="text2text-generation")
    return model, adapter, peftc.load(root / "out")


def _prompts(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7 tokens: row 1 left-padded by 2, row 2 right-padded by 3."""
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, pad), mask


def _peft(model: torch.nn.Module, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()


def _hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, pad: int) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=pad)


def _generate(model, runner, ids, mask):
    pad, eos = model.config.pad_token_id, model.generation_config.eos_token_id
    return runner.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_greedy_is_token_identical_to_peft_generate(request, name):
    model, adapter, runner = request.getfixturevalue(name)
    pad = model.config.pad_token_id
    ids, mask = _prompts(pad)
    got = _generate(model, runner, ids, mask)
    expected = _hf_generate(_peft(model, adapter), ids, mask, pad)
    assert got.shape == (3, 1 + NEW) and (got[:, 1:] != pad).all()  # no row stopped early
    assert torch.equal(got, expected)
    assert not torch.equal(got, _hf_generate(model, ids, mask, pad))  # the adapter changes what is generated


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_decoder_step_logits_match_peft_at_prefill_and_decode(request, name):
    """The artifact's steps (prefill of 3 tokens, then 1) against PEFT's forward over the whole prefix."""
    model, adapter, runner = request.getfixturevalue(name)
    ids, mask = _prompts(model.config.pad_token_id)
    decoder = torch.randint(3, 100, (3, 4), generator=torch.Generator().manual_seed(4))
    encoded = runner.encoder(input_ids=ids, attention_mask=mask)
    pasts = {}
    for layer in range(2):
        for kind in ("key", "value"):
            pasts[f"past_key_values_{layer}_decoder_{kind}"] = np.zeros((3, 4, 0, 8), np.float32)
            pasts[f"past_key_values_{layer}_encoder_{kind}"] = encoded[f"present.{layer}.encoder.{kind}"]
    peft_model = _peft(model, adapter)
    for start, end in ((0, 3), (3, 4)):
        out = runner(input_ids=decoder[:, start:end], encoder_attention_mask=mask, **pasts)
        with torch.no_grad():
            ref = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder[:, :end]).logits
        np.testing.assert_allclose(out["logits"], ref[:, start:end], atol=1e-4, rtol=1e-4, err_msg=f"{start}:{end}")
        assert out["present.1.decoder.key"].shape[2] == end
        pasts = seq2seq._next_pasts(out, pasts)


def test_mutations_are_caught(t5, monkeypatch):
    """Cross-attention K/V of another row, or a self-attention cache that never grows (each step then
    sees itself at position 0): the tokens are no longer PEFT's."""
    model, adapter, runner = t5
    ids, mask = _prompts(0)
    expected = _hf_generate(_peft(model, adapter), ids, mask, 0)
    assert torch.equal(_generate(model, runner, ids, mask), expected)
    good = seq2seq._next_pasts

    def rolled(out, pasts):
        nxt = good(out, pasts)
        return {n: np.roll(v, 1, axis=0) if "_encoder_" in n else v for n, v in nxt.items()}

    for broken in (rolled, lambda out, pasts: dict(pasts)):
        with monkeypatch.context() as patch:
            patch.setattr(seq2seq, "_next_pasts", broken)
            assert not torch.equal(_generate(model, runner, ids, mask), expected)


def test_sampling_is_reproducible_with_a_seed(bart):
    model, _, runner = bart
    ids, mask = _prompts(model.config.pad_token_id)
    options = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "max_new_tokens": 10}
    first = runner.generate(ids, mask, seed=5, **options)
    assert torch.equal(first, runner.generate(ids, mask, seed=5, **options))
    assert not torch.equal(first, runner.generate(ids, mask, seed=6, **options))


def test_one_artifact_lists_and_verifies_both_programs(t5):
    _, _, runner = t5
    files = {f["path"]: f["sha256"] for f in runner.manifest.target["files"]}
    for name in ("model.onnx", "encoder/model.onnx", "encoder/manifest.json", "tokenizer.json"):
        assert files[name] == hashlib.sha256((runner.path / name).read_bytes()).hexdigest(), name
    assert runner.manifest.options["task"] == "text2text-generation"  # inferred from config.architectures
    for manifest in (runner.manifest, runner.encoder.manifest):
        oracles = {case["oracle"] for case in manifest.verification["cases"]}
        assert manifest.status == "ok" and {"reference", "peft"} <= oracles
    assert runner.encoder.output_names[:2] == ["last_hidden_state", "present.0.encoder.key"]
    assert str(runner.path / "encoder") in runner.encoder.manifest.command  # its rebuild command, not a temp path
    assert "past_key_values_1_encoder_value" in runner.input_names


def test_peftc_generate_uses_the_tokenizer(t5, capsys):
    _, _, runner = t5
    code, out, err = run(capsys, "generate", runner.path, "--prompt", "w5 w9 w12", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    tokens = json.loads(out)[0]["tokens"]
    expected = runner.generate(torch.tensor([[5, 9, 12]]), max_new_tokens=6, eos_token_id=1, pad_token_id=0)
    assert tokens == expected[0, 1:].tolist()


def test_wrong_task_is_refused_in_one_line(t5, tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    _gpt2().save_pretrained(str(gpt2))
    t5_dir = t5[2].path.parent / "base"
    for model, task, says in ((gpt2, "text2text-generation", "GPT2LMHeadModel is not an encoder-decoder model"),
                              (t5_dir, "text-generation", "T5ForConditionalGeneration is not a causal")):  # fmt: skip
        code, _, err = run(capsys, "compile", model, "--adapter", t5[1], "-o", tmp_path / "o", "--task", task)
        assert code == 2 and says in error_line(err), err
