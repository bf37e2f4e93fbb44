"""Swappable artifacts: slots hold any fitting LoRA adapter exactly; adapters switch, mix per row and
run concurrently without recompiling; add-adapter refuses what does not fit and leaves the artifact
byte-for-byte unchanged."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import models
import numpy as np
import pytest
from conftest import assert_outputs_close

import peftc
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.hashing import sha256_file
from peftc.swap import add_adapter, remove_adapter

TARGETS = ["query", "value", "pooler.dense", "word_embeddings"]  # the pooler reads [batch, hidden]


def _lora(model, path, seed, **config):
    from peft import LoraConfig

    return models.make_adapter(model, path, LoraConfig(**config), seed=seed)


@pytest.fixture(scope="module")
def swappable(tmp_path_factory):
    """A tiny BERT compiled with three LoRA adapters of different ranks and scalings, bank of 3."""
    root = tmp_path_factory.mktemp("swap")
    model = models.tiny_bert()
    adapters = {
        "r4": _lora(model, root / "r4", 1, r=4, lora_alpha=8, target_modules=TARGETS),
        "r2_rs": _lora(model, root / "r2_rs", 2, r=2, lora_alpha=3, use_rslora=True, target_modules=["query", "value"]),
        "r6_pat": _lora(
            model, root / "r6_pat", 3, r=6, lora_alpha=4, alpha_pattern={"value": 12}, target_modules=["query", "value"]
        ),
    }
    artifact = peftc.compile(
        model, list(adapters.values()), out=root / "out", swappable=True, max_rank=8, multi_adapter=3
    )
    return model, adapters, artifact.path, root


def _expected(model, adapter, inputs):
    return _base(model, inputs) if adapter is None else models.peft_outputs(model, adapter, inputs)


def _base(model, inputs):
    import torch

    from peftc.ir import flatten_named

    with torch.no_grad():
        return {k: v.numpy() for k, v in flatten_named(model(**inputs)).items()}


def test_every_adapter_and_the_base_match_peft(swappable):
    model, adapters, out, _ = swappable
    runner = peftc.load(out)
    assert runner.adapters == ["r4", "r2_rs", "r6_pat"] and runner.adapter == "r4"
    manifest = runner.manifest
    assert manifest.verification["passed"]
    oracles = {c["oracle"] for c in manifest.verification["cases"]}
    assert {"base", "mixed batch"} <= oracles and {f"peft[{n}]" for n in adapters} <= oracles
    for batch, seq in [(2, 11), (1, 5)]:
        inputs = models.text_inputs(batch, seq)
        for name, path in [*adapters.items(), (None, None)]:
            assert_outputs_close(runner(**inputs, adapter=name), _expected(model, path, inputs))
        runner.set_adapter("r2_rs")
        assert_outputs_close(runner(**inputs), _expected(model, adapters["r2_rs"], inputs))
        runner.set_adapter("r4")


def test_slots_are_described_in_the_manifest(swappable):
    _, _, out, _ = swappable
    slots = peftc.load(out).manifest.target["slots"]
    assert slots["rank"] == 8 and slots["bank"] == 4 and slots["dtype"] == "float32"
    query = next(s for s in slots["slots"] if s["module"] == "encoder.layer.0.attention.self.query")
    assert query["keys"]["A"] == "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert query["tensors"]["A"]["shape"] == [4, 8, 32] and query["tensors"]["B"]["shape"] == [4, 32, 8]
    embedding = next(s for s in slots["slots"] if s["kind"] == "embedding")
    assert embedding["tensors"]["A"]["shape"] == [4, 100, 8]  # Aᵀ: rows are looked up, never transposed


def test_mixed_batch_matches_each_row_eagerly(swappable):
    model, adapters, out, _ = swappable
    runner = peftc.load(out)
    choice = ["r6_pat", None, "r4", "r2_rs", "r4", None]
    inputs = models.text_inputs(len(choice), 10)
    got = runner(**inputs, adapter=choice)
    for row, name in enumerate(choice):
        expected = _expected(model, adapters.get(name), inputs)
        assert_outputs_close({k: v[row] for k, v in got.items()}, {k: v[row] for k, v in expected.items()})
    with pytest.raises(InputError, match="no adapter named 'nope'"):
        runner(**inputs, adapter=["r4", "nope", None, None, None, None])
    with pytest.raises(InputError, match="lists 2 names for a batch of 6 rows"):
        runner(**inputs, adapter=["r4", None])


def test_switching_back_is_bit_identical_to_a_fresh_load(swappable):
    _, _, out, _ = swappable
    inputs = {k: v.numpy() for k, v in models.text_inputs(3, 9).items()}
    fresh = peftc.load(out)(**inputs, adapter="r4")
    runner = peftc.load(out)
    runner(**inputs, adapter="r2_rs")
    for name in ["r4", "r6_pat", "r2_rs", "r4"]:
        runner.set_adapter(name)
        runner(**inputs)
    again = runner(**inputs, adapter="r4")
    assert all(np.array_equal(fresh[k], again[k]) for k in fresh)


def test_concurrent_calls_with_different_adapters(swappable):
    model, adapters, out, _ = swappable
    runner = peftc.load(out)
    inputs = models.text_inputs(2, 8)
    expected = {name: _expected(model, adapters[name], inputs) for name in ("r4", "r6_pat")}
    failures: list[BaseException] = []

    def work(name):
        try:
            for _ in range(10):
                assert_outputs_close(runner(**inputs, adapter=name), expected[name])
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("r4", "r6_pat", "r4", "r6_pat")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def test_padding_is_exact(tmp_path):
    model = models.tiny_bert()
    adapter = _lora(model, tmp_path / "a", 4, r=4, lora_alpha=8, target_modules=TARGETS)
    tight = peftc.compile(model, adapter, out=tmp_path / "r4", swappable=True).path
    padded = peftc.compile(model, adapter, out=tmp_path / "r16", swappable=True, max_rank=16).path
    assert peftc.load(tight).manifest.target["slots"]["rank"] == 4
    inputs = {k: v.numpy() for k, v in models.text_inputs(2, 12).items()}
    a, b = peftc.load(tight)(**inputs), peftc.load(padded)(**inputs)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the padding contributes exact zeros


def test_without_a_bank_a_call_takes_one_adapter(tmp_path):
    model = models.tiny_bert()
    adapter = _lora(model, tmp_path / "a", 5, r=4, lora_alpha=8, target_modules=TARGETS)
    runner = peftc.load(peftc.compile(model, adapter, out=tmp_path / "out", swappable=True).path)
    inputs = {k: v.numpy() for k, v in models.text_inputs(2, 7).items()}
    one, per_row = runner(**inputs, adapter="a"), runner(**inputs, adapter=["a", "a"])
    assert all(np.array_equal(one[k], per_row[k]) for k in one)
    with pytest.raises(UnsupportedError, match="no adapter bank: one adapter per call"):
        runner(**inputs, adapter=["a", None])


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def copy(swappable, tmp_path):
    model, _, out, root = swappable
    return model, shutil.copytree(out, tmp_path / "artifact"), root


def test_add_adapter_then_remove_it(copy, tmp_path):
    model, artifact, _ = copy
    extra = _lora(model, tmp_path / "extra", 7, r=3, lora_alpha=5, target_modules=["value"])
    manifest = add_adapter(artifact, extra, name="late", model=model)
    entry = manifest.adapters[-1]
    assert entry["name"] == "late" and entry["verification"]["passed"]
    assert {c["oracle"] for c in entry["verification"]["cases"]} >= {"reference[late]", "peft[late]"}
    runner = peftc.load(artifact)
    assert "late" in runner.adapters
    inputs = models.text_inputs(2, 7)
    assert_outputs_close(runner(**inputs, adapter="late"), models.peft_outputs(model, extra, inputs))
    report = peftc.verify(artifact, model=model)
    assert report.passed and "peft[late]" in {c.oracle for c in report.cases}
    remove_adapter(artifact, "late")
    assert "late" not in peftc.load(artifact).adapters and not (artifact / entry["slot_file"]).exists()


def test_add_one_bit_adapter_and_refuse_compeft(copy, tmp_path):
    """peftc's 1-bit adapter (lowered as LoRA) fits the LoRA slots: its output is the model with
    ``W += s·(b·sign B)(a·sign A)``, per-row scales ``mean|row|``, computed here from the factors it was made
    of; a ComPEFT adapter (sparse slots: ``test_swap_s2ft.py``) on a LoRA slot is refused naming the module,
    the artifact unchanged."""
    import copy as copying

    import torch

    from peftc.methods import compeft, onebit

    model, artifact, _ = copy
    gen = torch.Generator().manual_seed(9)
    module = "encoder.layer.1.attention.self.value"
    a, b = torch.randn(3, 32, generator=gen), torch.randn(32, 3, generator=gen)
    add_adapter(artifact, onebit.save(tmp_path / "onebit", {module: (a, b)}, scaling=0.5), name="onebit", model=model)
    expected = copying.deepcopy(model)

    def one_bit(m):
        return m.abs().mean(1, keepdim=True) * torch.where(m >= 0, 1.0, -1.0)

    with torch.no_grad():
        expected.get_submodule(module).weight += 0.5 * one_bit(b) @ one_bit(a)
    inputs = models.text_inputs(2, 7)
    want = _base(expected, inputs)
    assert np.abs(want["last_hidden_state"] - _base(model, inputs)["last_hidden_state"]).max() > 0.1
    assert_outputs_close(peftc.load(artifact)(**inputs, adapter="onebit"), want)
    before = _hashes(artifact)
    ternary = compeft.save(tmp_path / "compeft", {f"{module}.weight": torch.randn(32, 32, generator=gen)}, 0.3, 1.0)
    with pytest.raises(InputError, match=rf"module '{module}' has a linear slot .* adds a sparse update"):
        add_adapter(artifact, ternary, name="ternary", model=model)
    assert _hashes(artifact) == before


@pytest.mark.parametrize(
    ("config", "name", "error", "match"),
    [
        ({"target_modules": ["key"]}, None, InputError, "module 'encoder.layer.0.attention.self.key' has no slot"),
        ({"r": 12, "target_modules": ["query"]}, None, InputError, "rank 12 is above the artifact's maximum rank 8"),
        ({"target_modules": ["query"], "use_dora": True}, None, UnsupportedError, "cannot be swapped"),
        ({"ia3": True}, None, UnsupportedError, "cannot be swapped"),
        ({"target_modules": ["query"], "modules_to_save": ["pooler"]}, None, UnsupportedError, "replaces full tensors"),
        ({"target_modules": ["query"]}, "r4", InputError, "an adapter named 'r4' exists"),
    ],
    ids=["no-slot", "rank", "dora", "ia3", "modules_to_save", "name-taken"],
)
def test_add_adapter_refusals_leave_the_artifact_unchanged(copy, tmp_path, config, name, error, match):
    model, artifact, _ = copy
    if config.pop("ia3", False):
        from peft import IA3Config

        models.make_adapter(model, tmp_path / "bad", IA3Config(target_modules=["query"], feedforward_modules=[]))
    else:
        _lora(model, tmp_path / "bad", 1, **{"r": 2, **config})
    before = _hashes(artifact)
    with pytest.raises(error, match=match):
        add_adapter(artifact, tmp_path / "bad", name=name, model=model)
    assert _hashes(artifact) == before


def test_add_adapter_failing_verification_leaves_the_artifact_unchanged(copy, tmp_path, monkeypatch):
    import peftc.swap.slots as slots

    model, artifact, _ = copy
    extra = _lora(model, tmp_path / "extra", 7, r=3, lora_alpha=5, target_modules=["value"])
    real = slots.pack
    # Mutation: forget to fold the LoRA scale into the B slot.
    monkeypatch.setattr(slots, "pack", lambda table, adapter: _unscaled(real, table, adapter))
    before = _hashes(artifact)
    with pytest.raises(VerificationError, match="vs peft\\[extra\\]|vs reference\\[extra\\]"):
        add_adapter(artifact, extra, model=model)
    assert _hashes(artifact) == before


def _unscaled(real, table, adapter):
    values = real(table, adapter)
    if adapter is not None:
        for site in adapter.sites:
            key = f"{site.module}:B"
            rank = site.tensors["lora_B"].tensor.shape[1]
            values[key][:, :rank] = site.tensors["lora_B"].tensor
    return values


def test_merged_artifacts_cannot_switch(minilm_artifacts):
    runner = peftc.load(minilm_artifacts[True])
    assert runner.adapters == ["minilm_lora"]
    with pytest.raises(UnsupportedError, match="compile with --swappable"):
        runner.set_adapter(None)
    with pytest.raises(InputError, match="not a swappable artifact"):
        add_adapter(minilm_artifacts[True], minilm_artifacts[True])
