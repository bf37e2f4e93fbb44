"""``--task text-generation`` with a prefix-tuning adapter: the base model's step, the prefix as the cache's head.

The oracle is PEFT's own forward run as a greedy loop: the prefill through ``PeftModelForCausalLM``
(which builds the prefix cache with ``get_prompt``, extends the mask and shifts the positions), each
decode step through it again with the cache it returned. PEFT's ``generate`` is not the oracle here:
with transformers 5.25 it passes the prefix as ``past_key_values`` beside generate's own ``cache``, and
the model keeps ``cache`` (the prefix is dropped; only the shifted positions and mask remain).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from test_generate import _llama, _prompts

import peftc
from peftc.errors import InputError
from peftc.generation import decode, prefix, prefix_check
from peftc.loaders.causal import key_name, value_name
from peftc.methods.loading import read_adapter

NEW = 12
COUNT = 4


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A tiny LLaMA (GQA) directory, a perturbed 4-token CAUSAL_LM prefix, and its generation artifact."""
    from peft import PrefixTuningConfig, get_peft_model

    root = tmp_path_factory.mktemp("gen-prefix")
    model = _llama()
    model.save_pretrained(str(root / "base"))
    peft_model = get_peft_model(
        copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=COUNT)
    )
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
    peft_model.save_pretrained(str(root / "prefix"))
    peftc.compile(model, [root / "prefix"], out=root / "out", task="text-generation")
    return root, model, peft_model.eval(), peftc.load(root / "out")


def _peft_greedy(peft_model, ids: torch.Tensor, mask: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens from PEFT's forward (module docstring) and its prefill logits. Positions are
    transformers' (running count - 1, 0 on padding); PEFT adds the virtual tokens to them."""
    tokens, step, cache, first = ids, ids, None, None
    for _ in range(new):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -step.shape[1] :]
        extra = {} if cache is None else {"cache": cache}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = peft_model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        first = out.logits if first is None else first
        cache, step = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
    return tokens, first


def test_greedy_is_token_identical_to_peft_and_the_prefill_logits_match(compiled):
    _, model, peft_model, runner = compiled
    files = {f["path"] for f in runner.manifest.target["files"]}
    assert prefix.FILE in files and runner.manifest.target["prefix"] == {
        "file": prefix.FILE, "virtual_tokens": COUNT, "positions": prefix.MASK
    }  # fmt: skip
    assert not any("prompt" in name for name in runner.input_names)  # the step is the base model's
    cases = {c["oracle"]: c for c in runner.manifest.verification["cases"]}
    assert all(o["ok"] for o in cases[prefix_check.ORACLE]["outputs"])  # compile checked the head with PEFT
    assert [(a["method"], a["sites"]) for a in runner.manifest.adapters] == [("prefix_tuning", [])]  # listed, hashed
    assert runner.manifest.verification["adapter_effect"]["logits (prefix)"] > 0.05
    ids, mask = _prompts()
    got = runner.generate(ids, mask, max_new_tokens=NEW)
    expected, prefill = _peft_greedy(peft_model, ids, mask, NEW)
    assert torch.equal(got, expected)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert not torch.equal(got, base)  # the prefix changes what is generated
    kv = prefix.expanded(prefix.read_head(runner, np.float32)[1], 3)
    ones = np.ones((3, COUNT), np.int64)
    step = runner(
        input_ids=ids, attention_mask=np.concatenate([ones, mask.numpy()], 1),
        position_ids=decode._prefix_positions(mask.numpy(), COUNT), **kv,
    )  # fmt: skip
    real = mask.bool()
    np.testing.assert_allclose(step["logits"][real], prefill[real], atol=1e-4, rtol=1e-4)


def test_mutations_are_caught(compiled, monkeypatch):
    """A cache without the prefix, or positions not shifted by it, give other tokens than PEFT's."""
    _, _, peft_model, runner = compiled
    ids, mask = _prompts()
    expected, _ = _peft_greedy(peft_model, ids, mask, NEW)
    positions = decode._prefix_positions
    with monkeypatch.context() as patch:
        patch.setattr(decode, "_prefix_positions", lambda m, count: positions(m, count) - count)
        assert not torch.equal(runner.generate(ids, mask, max_new_tokens=NEW), expected)
    with monkeypatch.context() as patch:  # the head's keys and values zeroed: the mask still counts them
        patch.setattr(
            prefix, "expanded", lambda kv, batch: {n: np.zeros((batch, *v.shape), v.dtype) for n, v in kv.items()}
        )
        assert not torch.equal(runner.generate(ids, mask, max_new_tokens=NEW), expected)


def test_compile_check_catches_swapped_keys_and_values(compiled):
    """The check compile runs (PEFT's prefill vs the step fed the stored head) fails on a broken head."""
    root, model, _, runner = compiled
    source = read_adapter(root / "prefix")
    head = {k: torch.from_numpy(v) for k, v in prefix.read_head(runner, np.float32)[1].items()}
    assert prefix_check.report(runner.backend_runner, model, source, head, 0).passed
    swapped = dict(head)
    swapped[key_name(0)], swapped[value_name(0)] = head[value_name(0)], head[key_name(0)]
    assert not prefix_check.report(runner.backend_runner, model, source, swapped, 0).passed


def test_prefix_with_swappable_is_refused_in_one_line(compiled, capsys):
    root, *_ = compiled
    argv = ["compile", root / "base", "--adapter", root / "prefix", "-o", root / "o", "--swappable"]
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if not line.startswith("[peftc")]
    assert code == 2 and len(lines) == 1 and "compile the prefix alone" in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("virtual_tokens", "x", "target.prefix should be"),  # was an internal error
        ("virtual_tokens", 0, "target.prefix should be"),
        ("file", "../prefix.safetensors", "does not list it in target.files"),  # was read from outside the artifact
        ("file", "model.onnx", "not a valid safetensors file"),  # was an internal error
        ("positions", "rows", "target.prefix.positions should be"),
    ],
)
def test_a_tampered_prefix_record_is_refused_in_one_line(compiled, tmp_path, field, value, message):
    root = compiled[0]
    copy_ = Path(shutil.copytree(root / "out", tmp_path / "out"))
    manifest = json.loads((copy_ / "manifest.json").read_text())
    manifest["target"]["prefix"][field] = value
    (copy_ / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=re.escape(message)):
        peftc.load(copy_).generate(torch.tensor([[5, 6]]), max_new_tokens=2)
