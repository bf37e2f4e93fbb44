"""``--swappable`` / ``--multi-adapter`` with ``--task text2text-generation``: the encoder program and the
decoder step each hold slots for the modules they run; one adapter name fills both."""

from __future__ import annotations

import json
import shutil
import types

import models
import pytest
import torch
from cli_run import error_line, run
from test_generate_seq2seq import NEW, _hf_generate, _peft, _prompts, _t5

import peftc
from peftc.cli import main
from peftc.errors import UnsupportedError
from peftc.loaders.seq2seq import ENCODER, TEXT2TEXT
from peftc.passes.base import PassContext
from peftc.swap.mode import Swappable

ROWS = ("a", None, "b")


@pytest.fixture(scope="module")
def swap(tmp_path_factory):
    """A T5 artifact compiled with adapter ``a`` (r=4 on q/k/v/o of every attention: the encoder program gets
    the encoder's and the cross-attention keys' and values' slots) in a bank of 2; ``b`` (r=2 on q/v) added
    by ``peftc add-adapter`` without recompiling. PEFT's greedy tokens for each, and for the base."""
    root = tmp_path_factory.mktemp("t5-swap")
    model = _t5()
    model.save_pretrained(str(root / "base"))
    a = models.make_lora(model, root / "a", target_modules=["q", "k", "v", "o"], r=4)
    b = models.make_lora(model, root / "b", target_modules=["q", "v"], r=2, seed=2)
    out = root / "out"
    command = ["compile", str(root / "base"), "--adapter", str(a), "-o", str(out), "--swappable"]
    assert main([*command, "--multi-adapter", "2"]) == 0
    assert main(["add-adapter", str(out), "--adapter", str(b)]) == 0
    ids, mask = _prompts(0)
    expected = {name: _hf_generate(_peft(model, path), ids, mask, 0) for name, path in (("a", a), ("b", b))}
    expected[None] = _hf_generate(model, ids, mask, 0)
    return model, peftc.load(out), expected


def _generate(runner, adapter):
    ids, mask = _prompts(0)
    return runner.generate(ids, mask, max_new_tokens=NEW, eos_token_id=1, pad_token_id=0, adapter=adapter)


def test_each_adapter_is_token_identical_to_peft_and_switching_back_repeats_it(swap):
    _, runner, expected = swap
    assert runner.adapters == runner.encoder.adapters == ["a", "b"]
    assert not torch.equal(expected["a"], expected["b"]) and not torch.equal(expected["a"], expected[None])
    assert all((tokens != 1).all() for tokens in expected.values())  # no row stopped early (eos is 1)
    for name in ("a", "b", None, "a"):  # A → B → base → A, no recompiling
        assert torch.equal(_generate(runner, name), expected[name]), name


def test_mixed_rows_match_each_adapters_own_peft_run(swap):
    _, runner, expected = swap
    got = _generate(runner, list(ROWS))
    for row, name in enumerate(ROWS):
        assert torch.equal(got[row], expected[name][row]), (row, name)


def test_the_encoder_reading_another_adapter_is_caught(swap, monkeypatch):
    """The encoder program with ``a``'s slots while the decoder step reads ``b``'s: neither PEFT run."""
    _, runner, expected = swap
    encoder = runner.encoder
    monkeypatch.setattr(runner, "_encoder", lambda adapter=None, **inputs: encoder(adapter="a", **inputs))
    got = _generate(runner, "b")
    assert not torch.equal(got, expected["b"]) and not torch.equal(got, expected["a"])


def test_both_programs_hash_their_slot_files_and_set_aside_the_others_keys(swap):
    _, runner, _ = swap
    files = {f["path"] for f in runner.manifest.target["files"]}
    assert {"adapters/b.onnx_adapter", "encoder/adapters/b.onnx_adapter", "encoder/manifest.json"} <= files
    encoder_slots = {s["module"] for s in runner.encoder.manifest.target["slots"]["slots"]}
    decoder_slots = {s["module"] for s in runner.manifest.target["slots"]["slots"]}
    assert "decoder.block.0.layer.1.EncDecAttention.v" in encoder_slots - decoder_slots
    assert "decoder.block.0.layer.0.SelfAttention.q" in decoder_slots - encoder_slots
    assert not any(m.startswith("encoder.") for m in decoder_slots)
    b = next(a for a in runner.encoder.manifest.adapters if a["name"] == "b")
    assert any("decoder.block.0.layer.0.SelfAttention.q" in u["key"] for u in b["unused_keys"]), b["unused_keys"]


def test_remove_adapter_drops_it_from_both_programs(swap, tmp_path, capsys):
    _, runner, expected = swap
    copy = tmp_path / "out"
    shutil.copytree(runner.path, copy)
    code, _, err = run(capsys, "remove-adapter", copy, "--name", "b")
    assert code == 0, err
    removed = peftc.load(copy)
    assert removed.adapters == removed.encoder.adapters == ["a"]
    assert not (copy / "encoder" / "adapters" / "b.onnx_adapter").exists()
    assert torch.equal(_generate(removed, "a"), expected["a"])


def test_an_adapter_above_the_slot_rank_is_refused_in_one_line(swap, tmp_path, capsys):
    model, runner, _ = swap
    wide = models.make_lora(model, tmp_path / "wide", target_modules=["q"], r=8, seed=3)
    before = json.loads((runner.path / "encoder" / "manifest.json").read_text())
    code, _, err = run(capsys, "add-adapter", runner.path, "--adapter", wide)
    line = error_line(err)
    assert code == 2 and "rank 8 is above the artifact's maximum rank 4" in line and ".q." in line, err
    assert json.loads((runner.path / "encoder" / "manifest.json").read_text()) == before
    assert peftc.load(runner.path).adapters == ["a", "b"]


@pytest.mark.parametrize(("task", "program"), [(TEXT2TEXT, "decoder step"), (ENCODER, "encoder program")])
def test_adapters_that_leave_a_program_without_slots_are_refused(task, program):
    """An adapter on the encoder only leaves the decoder step without a slot (and one on the decoder's
    self-attention only, the encoder program): refused before anything is lowered."""
    built = types.SimpleNamespace(loaded=types.SimpleNamespace(task=task), adapters=(types.SimpleNamespace(sites=()),))
    with pytest.raises(UnsupportedError, match=f"no given adapter adapts a module the {program} runs"):
        Swappable().optimize(built, PassContext())
