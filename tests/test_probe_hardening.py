"""Hostile and careless inputs found by a second probe: each is exit 2 (or an ``InputError``) with one line
naming the file, field or flag, never an internal error, and nothing of the user's is changed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import edited_adapter
from safetensors.torch import load_file, save_file

import peftc
from peftc.cli import main
from peftc.errors import InputError
from peftc.options import CompileOptions


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error(capsys, *argv) -> str:
    code, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if not line.startswith("[peftc") and "note: hid" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("peftc: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def swappable(bert_swappable) -> Path:
    """The session's swappable tiny BERT (tests edit copies of it, never the artifact itself)."""
    return bert_swappable


def _paths(value, prefix=()):
    """Every field path of a JSON value (the first two items of each list)."""
    items = value.items() if isinstance(value, dict) else enumerate(value[:2]) if isinstance(value, list) else ()
    for key, item in items:
        yield (*prefix, key)
        yield from _paths(item, (*prefix, key))


def _edited(swappable: Path, where: Path, path: tuple, value) -> Path:
    copy = where if where.exists() else Path(shutil.copytree(swappable, where))
    data = json.loads((swappable / "manifest.json").read_text())
    holder = data
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_inspect_of_a_manifest_with_any_field_of_the_wrong_type(capsys, swappable, tmp_path):
    """Every field of a real manifest set to a value of another type: inspect shows it or refuses it."""
    manifest = json.loads((swappable / "manifest.json").read_text())
    wrong = [None, "x", 7, [], {}]
    failures = []
    paths = [p for p in _paths(manifest) if p != ("schema_version",)]
    for index, path in enumerate(paths[::3]):  # a third of the ~400 fields, each type of value in turn
        copy = _edited(swappable, tmp_path / "a", path, wrong[index % len(wrong)])
        code, err = run(capsys, "inspect", copy)
        if code not in (0, 1, 2) or "internal error" in err:
            failures.append(f"{'.'.join(map(str, path))}: {err.strip()[-120:]}")
    assert not failures, f"{len(failures)} fields: " + "\n".join(failures[:10])


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("adapters", 0), 1, "adapters[0]"),
        (("adapters", 0, "weights_file"), None, "adapters[0].weights_file"),
        (("target", "signature", "dims", "seq", "max"), "x", "target.signature.dims.seq.max"),
        (("target", "slots", "rank"), None, "target.slots.rank"),
        (("target", "slots", "slot_depth"), "x", "target.slots.slot_depth"),
        (("target", "slots", "slots", 0, "tensors"), None, "target.slots.slots[0].tensors"),
        (("target", "outputs"), 3, "target.outputs"),
        (("options", "seed"), 2**70, "options.seed"),
    ],
)
def test_running_or_verifying_a_manifest_with_a_field_of_the_wrong_type(
    capsys, swappable, tmp_path, path, value, field
):
    copy = _edited(swappable, tmp_path / "a", path, value)
    with pytest.raises(InputError, match=re.escape(field)):
        runner = peftc.load(copy)
        runner(input_ids=np.ones((1, 4), np.int64), attention_mask=np.ones((1, 4), np.int64), adapter=None)
    assert field in one_error(capsys, "verify", copy)


@pytest.mark.parametrize("seed", [2**70, -(2**63), True])
def test_seed_out_of_range(capsys, tmp_path, bert_dir, bert_adapter, seed):
    with pytest.raises(InputError, match="seed"):
        CompileOptions(model=bert_dir, adapters=(bert_adapter,), out=tmp_path / "out", seed=seed)
    if seed is not True:
        assert "--seed" in one_error(
            capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", tmp_path / "o", "--seed", seed
        )


@pytest.mark.parametrize("where", ["file", "model", "adapter", "user"])
def test_dump_ir_writes_only_into_a_new_empty_or_dump_directory(capsys, tmp_path, bert_dir, bert_adapter, where):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    target = {"file": user / "notes.txt", "model": bert_dir, "adapter": bert_adapter / "sub", "user": user}[where]
    before = sorted(p.name for p in Path(bert_dir).iterdir())
    line = one_error(
        capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", tmp_path / "out", "--dump-ir", target
    )
    assert "--dump-ir" in line
    assert (user / "notes.txt").read_text() == "mine" and sorted(p.name for p in Path(bert_dir).iterdir()) == before
    assert not (tmp_path / "out").exists() and not (bert_adapter / "sub").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"target_modules": 5}, "target_modules=5"),
        ({"target_modules": "(query"}, "not a valid regular expression"),
        ({"exclude_modules": [1]}, "exclude_modules"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"rank_pattern": ["query"]}, "rank_pattern"),
    ],
)
def test_module_selecting_config_fields_of_the_wrong_type(capsys, tmp_path, bert_dir, bert_adapter, config, message):
    adapter = edited_adapter(bert_adapter, tmp_path / "adapter", config=config)
    line = one_error(capsys, "compile", bert_dir, "--adapter", adapter, "-o", tmp_path / "out")
    assert "adapter_config.json" in line and message in line


def test_a_checkpoint_missing_a_weight_is_refused_not_initialised_at_random(capsys, tmp_path, bert_dir, bert_adapter):
    model = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    del tensors["encoder.layer.0.attention.self.query.weight"]
    save_file(tensors, model / "model.safetensors")
    line = one_error(capsys, "compile", model, "--adapter", bert_adapter, "-o", tmp_path / "out")
    assert "encoder.layer.0.attention.self.query.weight" in line and "at random" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "seq=1000"], "seq=1000: outside the sizes the artifact takes (seq in 1..64)"),
        (["--plot", "notes.txt"], "--plot notes.txt: give a file name ending in .png"),
    ],
)
def test_bench_sizes_and_plot_file(capsys, swappable, flags, message):
    assert message in one_error(capsys, "bench", swappable, "--reps", "1", "--batch", "1", *flags)


def test_force_keeps_an_artifact_holding_a_file_its_manifest_does_not_list(
    capsys, swappable, tmp_path, bert_dir, bert_adapter
):
    out = Path(shutil.copytree(swappable, tmp_path / "out"))
    (out / "notes.txt").write_text("mine")
    line = one_error(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out, "--force")
    assert "notes.txt" in line and (out / "notes.txt").read_text() == "mine"
    assert (out / "manifest.json").read_bytes() == (swappable / "manifest.json").read_bytes()


@pytest.mark.parametrize("shape", [(4,), (1, 1, 4)])
def test_an_input_of_the_wrong_rank_is_named_not_reported_missing(swappable, shape):
    """token_type_ids has a default shaped like the others: it could not be made, but the rank is the fault."""
    runner = peftc.load(swappable)
    with pytest.raises(InputError, match=rf"input 'input_ids': {len(shape)} dims .*expected \[batch, seq\]"):
        runner(input_ids=np.ones(shape, np.int64), attention_mask=np.ones(shape, np.int64), adapter=None)


def test_bench_refuses_a_batch_whose_inputs_exceed_the_memory_bound(capsys, swappable):
    line = one_error(capsys, "bench", swappable, "--batch", 10**8, "--reps", "1")
    assert "--batch 100000000" in line and "GiB" in line


def test_generate_on_an_artifact_that_does_not_generate(capsys, swappable):
    assert "not a generation artifact" in one_error(capsys, "generate", swappable, "--prompt", "hello")
