"""``runner(...)`` checks its inputs against the artifact's signature before any target runs them
(``peftc/feeds.py``): names, rank, dtype, named dims and their bounds, embedding index ranges, the
adapter choice; onnxruntime's own failures come back as one-line peftc errors, with nothing on
stderr. And many threads calling one swappable artifact with random adapters all get their adapter's
outputs."""

from __future__ import annotations

import random
import threading

import models
import numpy as np
import pytest
import torch

import peftc
from peftc.errors import InputError, UnsupportedError
from peftc.feeds import InputCheck

VOCAB = models.tiny_bert().config.vocab_size
MAX_SEQ = models.tiny_bert().config.max_position_embeddings


def _lora(model, path, seed, **config):
    from peft import LoraConfig

    return models.make_adapter(model, path, LoraConfig(**config), seed=seed)


@pytest.fixture(scope="module")
def merged(bert_merged):
    """The tiny BERT with a LoRA merged, as ONNX."""
    return bert_merged.path


@pytest.fixture(scope="module")
def swappable(tmp_path_factory):
    """The tiny BERT with three swappable LoRA adapters (one on the embeddings) in a bank of 3."""
    root = tmp_path_factory.mktemp("inputs-swap")
    model = models.tiny_bert()
    adapters = {
        "a": _lora(model, root / "a", 1, r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"]),
        "b": _lora(model, root / "b", 2, r=2, lora_alpha=3, use_rslora=True, target_modules=["query", "value"]),
        "c": _lora(model, root / "c", 3, r=6, lora_alpha=4, target_modules=["query", "value"]),
    }
    out = peftc.compile(model, list(adapters.values()), out=root / "out", swappable=True, max_rank=8, multi_adapter=3)
    return model, adapters, out.path


def _inputs(batch=2, seq=8):
    return {k: v.numpy() for k, v in models.text_inputs(batch, seq).items()}


def _never_run(runner, monkeypatch):
    """Make the target's runner fail if called: the checks under test must refuse before it runs."""

    def run(*args, **kwargs):
        raise AssertionError("the target ran inputs the checks should have refused")

    monkeypatch.setattr(runner.backend_runner, "run", run)


def _with(**changes):
    inputs = _inputs()
    for name, value in changes.items():
        if value is None:
            del inputs[name]
        else:
            inputs[name] = value(inputs) if callable(value) else value
    return inputs


def _set(array, index, value):
    array = array.copy()
    array[index] = value
    return array


BAD_INPUTS = {
    "missing": (_with(attention_mask=None), r"missing \['attention_mask'\]"),
    "unexpected": (_with(position_ids=np.zeros((2, 8), np.int64)), r"unexpected \['position_ids'\]"),
    "float ids": (
        _with(input_ids=lambda i: i["input_ids"] + 0.7),
        "'input_ids': float64 values, but the input is int64",
    ),
    "bool ids": (
        _with(input_ids=lambda i: i["input_ids"] > 50),
        "'input_ids': bool values, but the input is int64 and not a mask",
    ),
    "string ids": (_with(input_ids=np.array([["a", "b"]])), "'input_ids': <U1 values, but the input is int64"),
    "ragged": (_with(input_ids=[[1, 2], [3]]), "'input_ids': not an array"),
    "rank": (_with(input_ids=lambda i: i["input_ids"][0]), r"'input_ids': 1 dims \[8\], expected \[batch, seq\]"),
    "seq differs": (_with(attention_mask=np.ones((2, 7), np.int64)), "'attention_mask': dim 1 .seq. is 7, but input "),
    "batch differs": (_with(attention_mask=np.ones((3, 8), np.int64)), "'attention_mask': dim 0 .batch. is 3"),
    "empty batch": (
        {"input_ids": np.zeros((0, 8), np.int64), "attention_mask": np.zeros((0, 8), np.int64)},
        r"dim 0 \(batch\) is 0, below its minimum 1",
    ),
    "seq too long": (
        {k: np.ones((1, MAX_SEQ + 1), np.int64) for k in ("input_ids", "attention_mask")},
        rf"dim 1 \(seq\) is {MAX_SEQ + 1}, above its maximum {MAX_SEQ}",
    ),
    "id = vocab": (_with(input_ids=lambda i: _set(i["input_ids"], (1, 3), VOCAB)), rf"value {VOCAB} at \[1, 3\]"),
    "negative id": (_with(input_ids=lambda i: _set(i["input_ids"], (0, 0), -1)), rf"outside \[0, {VOCAB}\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused_before_the_target_runs(merged, monkeypatch, case):
    inputs, message = BAD_INPUTS[case]
    runner = peftc.load(merged)
    _never_run(runner, monkeypatch)
    with pytest.raises(InputError, match=message) as error:
        runner(**inputs)
    assert "\n" not in str(error.value)


def test_safe_conversions_give_the_same_outputs(merged):
    runner = peftc.load(merged)
    inputs = _inputs()
    expected = runner(**inputs)
    for ids, mask in [
        (inputs["input_ids"].astype(np.int32), inputs["attention_mask"]),
        (inputs["input_ids"].astype(np.uint8), inputs["attention_mask"].astype(bool)),
        (inputs["input_ids"].tolist(), inputs["attention_mask"].astype(np.int32)),
    ]:
        got = runner(input_ids=ids, attention_mask=mask)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
    got = runner(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert all(isinstance(v, torch.Tensor) and np.array_equal(v.numpy(), expected[k]) for k, v in got.items())


def test_the_vocabulary_is_recorded_from_the_embedding(merged, swappable):
    ranges = {"input_ids": [0, VOCAB], "token_type_ids": [0, 2]}  # the vocabulary and the segment types
    assert peftc.load(merged).manifest.target["index_ranges"] == ranges
    # the swappable artifact adapts the word embeddings: its range still comes from the base model's
    assert peftc.load(swappable[2]).manifest.target["index_ranges"] == ranges


def test_onnxruntime_failures_are_one_line_peftc_errors_and_silent(merged, capfd):
    ort_runner = peftc.load(merged).backend_runner  # below the checks: onnxruntime sees id 1000
    inputs = _with(input_ids=lambda i: _set(i["input_ids"], (0, 0), 1000))
    inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])  # the target's runner takes every input
    capfd.readouterr()
    with pytest.raises(InputError, match="onnxruntime refused the inputs: .*indices element out of data bounds"):
        ort_runner.run(inputs)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("adapter", "error", "message"),
    [
        ([], InputError, "lists 0 names for a batch of 2 rows"),
        (["a", "b", "c"], InputError, "lists 3 names for a batch of 2 rows"),
        (("a",), InputError, "lists 1 names for a batch of 2 rows"),
        (["a", "nope"], InputError, "no adapter named 'nope'"),
        ("", InputError, "no adapter named ''"),
        (3, InputError, "adapter=3: expected an adapter name"),
        (["a", 3], InputError, "adapter= lists 3: expected adapter names or None"),
    ],
)
def test_bad_adapter_choices_are_refused_before_the_target_runs(swappable, monkeypatch, adapter, error, message):
    runner = peftc.load(swappable[2])
    _never_run(runner, monkeypatch)
    with pytest.raises(error, match=message):
        runner(**_inputs(), adapter=adapter)


def test_adapter_choice_on_a_merged_artifact_is_refused(merged, monkeypatch):
    runner = peftc.load(merged)
    _never_run(runner, monkeypatch)
    for adapter in ([], ["x", "y"], "x"):
        with pytest.raises(UnsupportedError, match="compile with --swappable"):
            runner(**_inputs(), adapter=adapter)


def test_a_tensorrt_profile_bounds_shapes_only_for_its_engine():
    target = {
        "signature": {
            "inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}],
            "dims": {"batch": {"name": "batch", "min": 1, "max": None}},
        },
        "tensorrt": {"profile": [{"name": "x", "min": [1, 4], "opt": [2, 4], "max": [8, 4]}]},
    }
    x = np.zeros((9, 4), np.float32)
    with pytest.raises(InputError, match=r"shape \[9, 4\] is outside the TensorRT engine's profile \[1, 4\]..\[8, 4\]"):
        InputCheck.from_target(target, ["x"], engine=True, where="m")({"x": x})
    arrays, sizes = InputCheck.from_target(target, ["x"], engine=False, where="m")({"x": x})  # its ONNX, with ORT
    assert sizes == {"batch": 9} and arrays["x"].dtype == np.float32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"signature": None}, "m: target.signature is missing or malformed"),
        (
            {"signature": {"inputs": [{"name": "x", "shape": [2], "dtype": "int8"}], "dims": {}}},
            "m: target.signature: input 'x' has a malformed dtype or shape",
        ),
        ({"index_ranges": {"x": [5, 1]}}, r"m: target.index_ranges: 'x' should be \[low, high\]"),
        ({"index_ranges": []}, "m: target.index_ranges: expected an object"),
    ],
)
def test_malformed_input_records_are_input_errors(change, message):
    target = {"signature": {"inputs": [{"name": "x", "shape": [2], "dtype": "int64"}], "dims": {}}, **change}
    with pytest.raises(InputError, match=message):
        InputCheck.from_target(target, ["x"], engine=True, where="m")


def _eager(model, adapter, inputs):
    from peftc.ir import flatten_named

    if adapter is not None:
        return models.peft_outputs(model, adapter, inputs)
    with torch.no_grad():
        return {k: v.numpy() for k, v in flatten_named(model(**inputs)).items()}


THREADS, CALLS = 8, 500


def test_concurrent_calls_with_random_adapters_never_mix_them_up(swappable):
    """8 threads × 500 calls, each with a seeded random choice: one adapter, the base, or one per row;
    each output against PEFT's eager output of that adapter for that row (computed once)."""
    model, adapters, out = swappable
    runner = peftc.load(out)
    inputs = models.text_inputs(2, 8)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    expected = {name: _eager(model, adapters.get(name), inputs) for name in [None, *adapters]}
    names = list(expected)
    for i, a in enumerate(names):  # a swap must show: every two adapters differ far beyond the tolerance
        for b in names[i + 1 :]:
            assert max(_error(expected[a][k], expected[b][k]) for k in expected[a]) > 1e-2
    mismatches: list[str] = []
    failures: list[BaseException] = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(CALLS):
                choice = rng.choice([*names, [rng.choice(names), rng.choice(names)]])
                got = runner(**feeds, adapter=choice)
                rows = choice if isinstance(choice, list) else [choice, choice]
                for row, name in enumerate(rows):
                    if any(_error(got[k][row], expected[name][k][row]) > 1e-5 for k in got):
                        mismatches.append(f"{choice} row {row}")
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert mismatches == [], f"{len(mismatches)} of {THREADS * CALLS} calls mixed adapters up: {mismatches[:5]}"


def _error(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_token_type_ids_are_an_input_that_defaults_to_zeros(merged, bert_adapter, monkeypatch):
    """A BERT-like model takes the tokenizer's ``token_type_ids``; left out, they are 0, as in
    transformers. Both agree with PEFT, and the segments really change the output."""
    runner = peftc.load(merged)
    assert runner.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    inputs = models.text_inputs(2, 7)
    segments = torch.ones_like(inputs["input_ids"])
    plain = runner(**inputs)
    assert_close = np.testing.assert_allclose
    expected = models.peft_outputs(models.tiny_bert(), bert_adapter, inputs)
    assert_close(plain["last_hidden_state"], expected["last_hidden_state"], rtol=1e-5, atol=1e-5)
    given = runner(**inputs, token_type_ids=segments)
    expected = models.peft_outputs(models.tiny_bert(), bert_adapter, {**inputs, "token_type_ids": segments})
    assert_close(given["last_hidden_state"], expected["last_hidden_state"], rtol=1e-5, atol=1e-5)
    assert float(np.abs(given["last_hidden_state"] - plain["last_hidden_state"]).max()) > 0.1
    _never_run(runner, monkeypatch)
    with pytest.raises(InputError, match=r"'token_type_ids'.*\[0, 2\)"):
        runner(**inputs, token_type_ids=segments * 2)
