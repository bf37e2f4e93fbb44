"""``--task text-generation``: the KV-cache step artifact and ``runner.generate`` against PEFT's generate."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import models
import numpy as np
import pytest
import torch
from cli_run import run

import peftc
from peftc.errors import InputError, UnsupportedError
from peftc.generation import decode
from peftc.loaders import load_model

NEW = 20


def _llama() -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return models._seeded(lambda: transformers.LlamaForCausalLM(config))


def _gpt2() -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return models._seeded(lambda: transformers.GPT2LMHeadModel(config))


def _tokenizer(path: Path) -> None:
    """A word-level tokenizer over the 100 ids (``[PAD]`` 0, ``[EOS]`` 1), saved as transformers saves one."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{f"w{i}": i for i in range(3, 100)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    fast.save_pretrained(str(path))


@pytest.fixture(scope="module")
def llama_banks(tmp_path_factory):
    """Two LLaMA (GQA) LoRAs in one ``--swappable --multi-adapter 2`` artifact, compiled from the in-memory
    model with an explicit ``task``."""
    root = tmp_path_factory.mktemp("gen-llama")
    model = _llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    first = models.make_lora(model, root / "first", target_modules=targets, seed=1)
    second = models.make_lora(model, root / "second", target_modules=targets[:2], seed=2)
    options = {
        "task": "text-generation",
        "swappable": True,
        "multi_adapter": 2,
        "oracle": False,
    }  # the tests compare with PEFT
    peftc.compile(model, [first, second], out=root / "out", **options)
    return model, (first, second), peftc.load(root / "out")


@pytest.fixture
def llama(llama_banks):
    """The LLaMA artifact with its first adapter as the default."""
    model, adapters, runner = llama_banks
    runner.set_adapter("first")
    return model, adapters[0], runner


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2 model directory with a tokenizer, compiled by the plain CLI command (task inferred)."""
    root = tmp_path_factory.mktemp("gen-gpt2")
    model = _gpt2()
    model.save_pretrained(str(root / "base"))
    _tokenizer(root / "base")
    adapter = models.make_lora(model, root / "lora", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    from peftc.cli import main

    assert main(["compile", str(root / "base"), "--adapter", str(adapter), "-o", str(root / "out")]) == 0
    return model, adapter, peftc.load(root / "out")


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7 tokens, rows 1 and 2 left-padded by 2 and 4 (pad id 0)."""
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _peft(model: torch.nn.Module, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()


def _hf_generate(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's greedy ``generate`` (stopping at the config's eos token, padding with 0)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_is_token_identical_to_peft_generate(request, name):
    model, adapter, runner = request.getfixturevalue(name)
    ids, mask = _prompts()
    eos = model.generation_config.eos_token_id
    got = runner.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    expected = _hf_generate(_peft(model, adapter), ids, mask)
    assert got.shape[1] >= 7 + 16 and ((got[:, 7:] != 0).sum(1) >= NEW).any()  # no early stop for most rows
    assert torch.equal(got, expected)
    assert not torch.equal(got, _hf_generate(model, ids, mask))  # the adapter changes what is generated


def test_one_batch_generates_with_an_adapter_per_row(llama_banks):
    model, (first, second), runner = llama_banks
    ids, mask = _prompts()
    eos = model.generation_config.eos_token_id
    got = runner.generate(
        ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, adapter=["second", None, "first"]
    )
    for row, oracle in enumerate([_peft(model, second), model, _peft(model, first)]):
        expected = _hf_generate(oracle, ids, mask)  # the whole batch, so that row's numbers are computed alike
        length = min(got.shape[1], expected.shape[1])  # each batch stops when all its rows ended
        assert torch.equal(got[row, :length], expected[row, :length]), f"row {row}"


def test_every_step_logits_match_peft_with_its_cache(llama):
    """Prefill and 6 decode steps: the artifact (fed its own present.*) against PEFT with a DynamicCache."""
    from transformers import DynamicCache

    model, adapter, runner = llama
    peft_model, cache = _peft(model, adapter), DynamicCache()
    ids, mask = _prompts()
    pasts = {n: np.zeros((3, 2, 0, 8), np.float32) for n in runner.input_names if n.startswith("past_")}
    step = ids
    for index in range(7):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -step.shape[1] :]
        with torch.no_grad():
            ref = peft_model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        got = runner(input_ids=step, attention_mask=mask, position_ids=positions, **pasts)
        real = mask[:, -step.shape[1] :].bool()  # padded query positions are nobody's output
        np.testing.assert_allclose(got["logits"][real], ref.logits[real], atol=1e-4, rtol=1e-4, err_msg=f"step {index}")
        cache = ref.cache
        pasts = {n: got[decode._present(n)].numpy() for n in pasts}
        step = ref.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)


def test_prefill_and_ten_decode_steps_equal_full_recompute(llama):
    _, _, runner = llama
    ids, mask = _prompts()
    feed = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(9))
    empty = {n: np.zeros((3, 2, 0, 8), np.float32) for n in runner.input_names if n.startswith("past_")}
    step, pasts = ids, empty
    for index in range(11):
        positions = decode._positions(mask.numpy())[:, -step.shape[1] :]
        out = runner(input_ids=step, attention_mask=mask, position_ids=positions, **pasts)
        prefix = torch.cat([ids, feed[:, :index]], dim=1)
        full = runner(input_ids=prefix, attention_mask=mask, position_ids=decode._positions(mask.numpy()), **empty)
        np.testing.assert_allclose(out["logits"][:, -1], full["logits"][:, -1], atol=1e-5, err_msg=f"step {index}")
        assert out["present.1.key"].shape[2] == prefix.shape[1]
        pasts = {n: out[decode._present(n)].numpy() for n in pasts}
        step = feed[:, index : index + 1]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)


def test_mutations_are_caught(llama, monkeypatch):
    """Broken position ids change the tokens PEFT agrees on; a dropped cache update is refused by the
    input check (the mask then covers one token more than past + new)."""
    _, _, runner = llama
    ids, mask = _prompts()
    good = runner.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    with monkeypatch.context() as patch:
        patch.setattr(decode, "_positions", lambda m: np.zeros_like(m))
        assert not torch.equal(runner.generate(ids, mask, max_new_tokens=8, pad_token_id=0), good)
    with monkeypatch.context() as patch:
        patch.setattr(decode, "_next_pasts", lambda out, pasts: pasts)  # the caches never grow
        with pytest.raises(InputError, match=r"'attention_mask': total is 8, but past \(0.*\+ seq \(1.*= 1"):
            runner.generate(ids, mask, max_new_tokens=2)


def test_sampling_is_reproducible_with_a_seed(llama):
    _, _, runner = llama
    ids, mask = _prompts()
    options = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "max_new_tokens": 12}
    first = runner.generate(ids, mask, seed=5, **options)
    assert torch.equal(first, runner.generate(ids, mask, seed=5, **options))
    assert not torch.equal(first, runner.generate(ids, mask, seed=6, **options))


def test_bad_inputs_are_refused_in_one_line(llama, bert_dir, bert_adapter, tmp_path, capsys):
    _, _, runner = llama
    ids, _ = _prompts()
    with pytest.raises(InputError, match="exceeds the model's 64 positions"):
        runner.generate(torch.ones(1, 50, dtype=torch.long), max_new_tokens=20)
    shaped = {n: np.zeros((3, 2, 4, 8), np.float32) for n in runner.input_names if n.startswith("past_")}
    shaped["past_key_values_1_value"] = np.zeros((3, 2, 3, 8), np.float32)
    with pytest.raises(InputError, match="past_key_values_1_value.*past"):
        runner(input_ids=ids[:, :1], attention_mask=np.ones((3, 5), np.int64), position_ids=ids[:, :1] * 0, **shaped)
    with pytest.raises(UnsupportedError, match="BertModel is not a causal language model"):
        load_model(models.tiny_bert(), task="text-generation")
    argv = ["compile", bert_dir, "--adapter", bert_adapter, "-o", tmp_path / "o", "--task", "text-generation"]
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if not line.startswith("[peftc")]
    assert code == 2 and len(lines) == 1 and "text-generation" in lines[0] and "Traceback" not in err, err
    code, _, err = run(capsys, "generate", runner.path, "--prompt", "w5")  # built from a module: no tokenizer
    assert code == 2 and err.strip().endswith("no tokenizer files in the artifact (its model directory had none)")


def test_artifact_carries_tokenizer_and_peftc_generate_uses_it(gpt2, capsys):
    _, _, runner = gpt2
    files = {f["path"]: f["sha256"] for f in runner.manifest.target["files"]}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert runner.manifest.options["task"] == "text-generation"  # inferred from config.architectures
    code, out, err = run(capsys, "generate", runner.path, "--prompt", "w5 w9 w12", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    tokens = json.loads(out)[0]["tokens"]
    expected = runner.generate(torch.tensor([[5, 9, 12]]), max_new_tokens=6, eos_token_id=1, pad_token_id=0)
    assert tokens == expected[0, 3:].tolist()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "   "], "--prompt '   ': the tokenizer makes no tokens of it"),
        (["--prompt", "w5", "--max-new-tokens", "0"], "max_new_tokens=0: give at least 1 new token"),
        (["--prompt", "w5", "--do-sample", "--top-p", "0"], "top_p=0.0: give a probability in (0, 1]"),  # was exit 3
        (["--prompt", "w5", "--do-sample", "--top-p", "nan"], "top_p=nan"),
        (["--prompt", "w5", "--do-sample", "--temperature", "inf"], "temperature=inf: give a finite positive"),
        (["--prompt", "w5", "--adapter", ""], "adapters are compiled into this artifact"),  # "" was no adapter
    ],
)
def test_generate_options_out_of_range_are_one_line(gpt2, capsys, flags, message):
    _, _, runner = gpt2
    code, _, err = run(capsys, "generate", runner.path, *flags)
    lines = [line for line in err.splitlines() if not line.startswith("[peftc") and "note: hid" not in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize(
    "options, named",
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens=2.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"do_sample": "yes"}, "do_sample='yes'"),
        ({"seed": "x", "do_sample": True}, "seed 'x'"),
        ({"pad_token_id": -1}, "pad_token_id=-1"),
    ],
)
def test_generate_python_options_of_the_wrong_type(gpt2, options, named):
    _, _, runner = gpt2
    with pytest.raises(InputError, match=re.escape(named)):
        runner.generate(torch.tensor([[5, 9]]), **{"max_new_tokens": 2, **options})
