"""Hostile and mistaken inputs: each is exit 2 with one line naming the file, key or flag, at once.

Non-regular files (FIFO, a symlink to /dev/zero, a directory) must be refused without blocking or
reading them, so those tests run under an alarm.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import edited_adapter
from safetensors.torch import load_file, save_file

from peftc.cli import main

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q = "base_model.model.encoder.layer.0.attention.self.query"


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("[peftc")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("peftc: error: "), err
    return lines[0]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (rather than hang the suite) if the body blocks on a FIFO or reads /dev/zero forever."""

    def expired(*_):
        raise TimeoutError(f"blocked for {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def compile_error(capsys, tmp_path, bert_dir, adapter, *flags) -> str:
    out = tmp_path / "out"
    code, err = run(capsys, "compile", bert_dir, "--adapter", adapter, "-o", out, *flags)
    assert code == 2, err
    assert not out.exists()
    return error_line(err)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize("kind", [_fifo, _dev_zero, _directory], ids=["fifo", "dev-zero", "directory"])
@pytest.mark.parametrize("file", [WEIGHTS, CONFIG])
def test_non_regular_adapter_file_is_refused_at_once(capsys, tmp_path, bert_dir, bert_adapter, kind, file):
    adapter = Path(shutil.copytree(bert_adapter, tmp_path / "adapter"))
    (adapter / file).unlink()
    kind(adapter / file)
    with deadline(60):
        line = compile_error(capsys, tmp_path, bert_dir, adapter)
    what = {"_fifo": "a FIFO", "_dev_zero": "a device", "_directory": "a directory"}[kind.__name__]
    assert f"{adapter / file}: {what}, not a regular file" in line


@pytest.mark.parametrize("kind", [_fifo, _dev_zero, _directory], ids=["fifo", "dev-zero", "directory"])
def test_non_regular_calibration_file_is_refused_before_any_work(capsys, tmp_path, bert_dir, bert_adapter, kind):
    """The calibration file is read after the export: a FIFO there would block a compile minutes in."""
    kind(tmp_path / "calib.npz")
    with deadline(60):
        line = compile_error(
            capsys, tmp_path, bert_dir, bert_adapter, "--precision", "int8", "--calibration", tmp_path / "calib.npz"
        )
    what = {"_fifo": "a FIFO", "_dev_zero": "a device", "_directory": "a directory"}[kind.__name__]
    assert f"--calibration {tmp_path / 'calib.npz'}: {what}, not a regular file" in line
    from peftc.driver.quantize import calibration  # the reader ``peftc analyze`` uses too
    from peftc.errors import InputError
    from peftc.loaders.inputs import parse_inputs

    with deadline(60), pytest.raises(InputError, match=f"{what}, not a regular file"):
        calibration(tmp_path / "calib.npz", 1, parse_inputs(["x:batch,4:float32"]), 0)


def test_deeply_nested_config(capsys, tmp_path, bert_dir, bert_adapter):
    adapter = Path(shutil.copytree(bert_adapter, tmp_path / "adapter"))
    (adapter / CONFIG).write_text('{"peft_type": "LORA", "x": ' + "[" * 10000 + "]" * 10000 + "}")
    line = compile_error(capsys, tmp_path, bert_dir, adapter)
    assert f"{adapter / CONFIG}: JSON nested too deeply" in line


def test_oversized_config(capsys, tmp_path, bert_dir, bert_adapter):
    adapter = edited_adapter(bert_adapter, tmp_path / "adapter", config={"padding": "x" * (2 << 20)})
    line = compile_error(capsys, tmp_path, bert_dir, adapter)
    assert f"{adapter / CONFIG}:" in line and "at most 1048576 bytes" in line


def test_safetensors_header_is_checked_against_the_file_size(capsys, tmp_path, bert_dir, bert_adapter):
    adapter = Path(shutil.copytree(bert_adapter, tmp_path / "adapter"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 10], "data_offsets": [0, 1 << 32]}}).encode()
    (adapter / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    with deadline(60):
        line = compile_error(capsys, tmp_path, bert_dir, adapter)
    assert "adapter_model.safetensors: not a valid safetensors file" in line and "the file holds 64" in line


@pytest.mark.parametrize("config", [{"r": 0}, {"rank_pattern": {"query": 0}}], ids=["r", "rank_pattern"])
def test_rank_zero(capsys, tmp_path, bert_dir, bert_adapter, config):
    adapter = edited_adapter(bert_adapter, tmp_path / "adapter", config=config)
    line = compile_error(capsys, tmp_path, bert_dir, adapter)
    assert f"{adapter / CONFIG}: r=0 for module" in line and "give a rank >= 1" in line


def test_zero_size_tensor(capsys, tmp_path, bert_dir, bert_adapter):
    def empty(tensors):
        tensors[f"{Q}.lora_A.weight"] = torch.zeros(0, 32)
        tensors[f"{Q}.lora_B.weight"] = torch.zeros(32, 0)
        return tensors

    adapter = edited_adapter(bert_adapter, tmp_path / "adapter", config={"r": 0}, tensors=empty)
    line = compile_error(capsys, tmp_path, bert_dir, adapter)
    assert f"{WEIGHTS}:{Q}.lora_" in line and "zero-size tensor" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_non_finite_adapter_tensor(capsys, tmp_path, bert_dir, bert_adapter, value, merge):
    key = f"{Q}.lora_B.weight"
    tensor = load_file(bert_adapter / WEIGHTS)[key].clone()
    tensor[3, 1] = value
    adapter = edited_adapter(bert_adapter, tmp_path / "adapter", tensors={key: tensor})
    line = compile_error(capsys, tmp_path, bert_dir, adapter, *([] if merge else ["--no-merge"]))
    assert f"{WEIGHTS}:{key}: holds {'NaN' if value != value else 'Inf'}" in line


def test_huge_max_rank(capsys, tmp_path, bert_dir, bert_adapter):
    line = compile_error(capsys, tmp_path, bert_dir, bert_adapter, "--swappable", "--max-rank", str(10**12))
    assert "--max-rank 1000000000000 is above 32" in line


def test_huge_multi_adapter(capsys, tmp_path, bert_dir, bert_adapter):
    line = compile_error(capsys, tmp_path, bert_dir, bert_adapter, "--swappable", "--multi-adapter", str(10**12))
    assert "--multi-adapter 1000000000000: at most 1024" in line


@pytest.fixture(scope="module")
def swappable(bert_swappable) -> Path:
    return bert_swappable


@pytest.mark.parametrize("name", ["../x", "a/b", "", "a\x01b", "x" * 240, "1st", "a.b"])
def test_bad_adapter_names_are_refused_with_the_rule(capsys, swappable, bert_adapter, name):
    before = sorted(p.name for p in (swappable / "adapters").iterdir())
    code, err = run(capsys, "add-adapter", swappable, "--adapter", bert_adapter, "--name", name)
    assert code == 2
    line = error_line(err)
    assert "is not allowed: use 1 to 64 ASCII letters, digits and '_', not starting with a digit" in line
    assert sorted(p.name for p in (swappable / "adapters").iterdir()) == before


def test_nul_in_a_name_from_python(bert_adapter):
    from peftc.errors import InputError
    from peftc.methods.loading import read_adapter

    with pytest.raises(InputError, match="is not allowed"):
        read_adapter(bert_adapter, name="a\x00b")


def test_default_name_from_a_long_directory_is_cut(tmp_path, bert_adapter):
    from peftc.methods.loading import read_adapter

    adapter = shutil.copytree(bert_adapter, tmp_path / ("my-adapter." + "x" * 230))
    assert read_adapter(adapter).name == ("my_adapter_" + "x" * 230)[:64]


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ("inspect", ["model", "state_sha256"]),
        ("inspect", ["adapters", 0, "name"]),
        ("inspect", ["target", "inputs"]),
        ("inspect", ["verification", "cases", 0, "outputs"]),
        ("verify", ["model", "spec"]),
        ("verify", ["target", "slots", "rank"]),
    ],
)
def test_manifest_missing_a_field(capsys, tmp_path, swappable, command, field):
    artifact = Path(shutil.copytree(swappable, tmp_path / "artifact"))
    manifest = json.loads((artifact / "manifest.json").read_text())
    owner = manifest
    for key in field[:-1]:
        owner = owner[key]
    del owner[field[-1]]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    code, err = run(capsys, command, artifact, *(["--no-oracle"] if command == "verify" else []))
    assert code == 2, err
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in field).lstrip(".")
    assert f"manifest.json: missing field {path!r}" in error_line(err)


@pytest.mark.parametrize("kind", [_fifo, _dev_zero], ids=["fifo", "dev-zero"])
def test_non_regular_model_weights_are_refused_at_once(capsys, tmp_path, bert_dir, bert_adapter, kind):
    model = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    (model / "model.safetensors").unlink()
    kind(model / "model.safetensors")
    with deadline(60):
        line = compile_error(capsys, tmp_path, model, bert_adapter)
    assert f"{model / 'model.safetensors'}: a " in line and "not a regular file" in line


def test_adapter_weights_are_read_into_memory_once(tmp_path):
    """Reading a 64 MiB safetensors file raises the peak RSS by about 64 MiB, not twice that."""
    import subprocess
    import sys

    path = tmp_path / WEIGHTS
    save_file({f"t{i}": torch.ones(1 << 20) for i in range(16)}, path)
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS, so torch's import does not count.
    script = (
        "import re, sys, torch\n"
        "from peftc import reading\n"
        "def hwm(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = hwm()\n"
        "tensors, _ = reading.read_safetensors(sys.argv[1])\n"
        "print(hwm() - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.strip().splitlines()[-1])
    assert (60 << 20) < grown < (96 << 20), f"peak RSS grew by {grown >> 20} MiB reading a 64 MiB file"


def test_a_safetensors_sink_gets_each_tensor_as_read_and_the_hash_of_the_whole_file(tmp_path):
    """The ``timm:`` loader's path: header shapes first, then each tensor handed over (none kept), hashed."""
    from peftc import reading
    from peftc.hashing import sha256_file

    file = tmp_path / "w.safetensors"
    save_file({"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}, str(file))
    headers, seen = [], {}
    kept, digest = reading.read_safetensors(file, lambda k, t: seen.setdefault(k, t.clone()), headers.append)
    assert headers == [{"a": ("bfloat16", (4,)), "b": ("float32", (2, 3))}] and kept == {}
    assert digest == sha256_file(file) and seen.keys() == load_file(file).keys()
    assert all(torch.equal(seen[k], v) for k, v in load_file(file).items())
