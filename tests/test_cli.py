"""The command line: exit codes, one-line errors without tracebacks, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_run import error_line, run
from safetensors.torch import load_file, save_file

from peftc.cli import main


def test_compile_inspect_verify(capsys, tmp_path, bert_dir, bert_adapter):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "merge" in stdout and "[peftc" in err
    assert "verify: artifact vs eager reference and PEFT" in err

    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0
    for section in ("adapter", "pass", "tol abs / rel", "rebuild: peftc compile"):
        assert section in stdout
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0 and json.loads(stdout) == {**manifest, "integrity": {"status": "intact", "problems": []}}

    code, stdout, err = run(capsys, "verify", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["passed"] and {c["oracle"] for c in report["cases"]} == {"reference", "peft"}


def test_verify_from_another_directory(capsys, tmp_path, bert_dir, bert_adapter, monkeypatch):
    import shutil as sh

    work = tmp_path / "work"
    work.mkdir()
    sh.copytree(bert_dir, work / "base")
    sh.copytree(bert_adapter, work / "adapter")
    monkeypatch.chdir(work)
    assert run(capsys, "compile", "base", "--adapter", "adapter", "-o", "out")[0] == 0
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "verify", "work/out")
    assert code == 0, err


def test_rebuild_command_reproduces_the_artifact(capsys, tmp_path, bert_dir, bert_adapter):
    out = tmp_path / "out"
    assert run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out, "--no-merge")[0] == 0
    command = json.loads((out / "manifest.json").read_text())["command"]
    assert command[:2] == ["peftc", "compile"] and "--no-merge" in command
    first = (out / "model.onnx").read_bytes()
    assert run(capsys, *command[1:])[0] == 0
    assert (out / "model.onnx").read_bytes() == first


def test_dump_ir_writes_graphs_per_pass(capsys, tmp_path, bert_dir, bert_adapter):
    code, _, err = run(
        capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", tmp_path / "out", "--dump-ir", tmp_path / "ir"
    )
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert names[0] == "00_input.txt" and "04_merge.txt" in names
    assert "peftc.lora_linear" in (tmp_path / "ir" / "02_insert-sites.txt").read_text()


def _adapter_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path: Path, edit) -> Path:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    return path


Q = "base_model.model.encoder.layer.0.attention.self.query"


def _missing_config(a: Path) -> None:
    (a / "adapter_config.json").unlink()


def _truncated(a: Path) -> None:
    data = (a / "adapter_model.safetensors").read_bytes()
    (a / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(a: Path) -> None:
    (a / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _unknown_module(a: Path) -> None:
    _edit_tensors(a, lambda t: t.update({f"{Q}x.lora_A.weight": t.pop(f"{Q}.lora_A.weight")}))


def _rank_mismatch(a: Path) -> None:
    _edit_tensors(a, lambda t: t.update({f"{Q}.lora_A.weight": torch.randn(3, 32)}))


def _d_in_mismatch(a: Path) -> None:
    _edit_tensors(a, lambda t: t.update({f"{Q}.lora_A.weight": torch.randn(4, 48)}))


def _unknown_type(a: Path) -> None:
    config = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "SOMETHING_NEW"}))


def _replication(a: Path) -> None:
    config = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps(config | {"layer_replication": [[0, 1]]}))


def _pickle(a: Path) -> None:
    tensors = load_file(a / "adapter_model.safetensors")
    (a / "adapter_model.safetensors").unlink()
    torch.save(tensors, a / "adapter_model.bin")


BAD_ADAPTERS = [
    pytest.param(_missing_config, "adapter_config.json: missing adapter config", id="missing-config"),
    pytest.param(_truncated, "adapter_model.safetensors: not a valid safetensors file", id="truncated-safetensors"),
    pytest.param(_garbage, "adapter_model.safetensors: not a valid safetensors file", id="corrupt-safetensors"),
    pytest.param(_unknown_module, "queryx.*which the base model does not execute; did you mean", id="unknown-module"),
    pytest.param(
        _rank_mismatch,
        r"query.lora_A.weight: shape \[3, 32\] does not match the base model: expected \[r=4",
        id="rank-mismatch",
    ),
    pytest.param(
        _d_in_mismatch, r"shape \[4, 48\] does not match the base model: expected \[r=4, d_in=32\]", id="d_in-mismatch"
    ),
    pytest.param(_unknown_type, "peft_type 'SOMETHING_NEW' is not supported", id="unknown-peft-type"),
    pytest.param(_replication, "layer_replication=.*changes the model's topology", id="unsupported-option"),
    pytest.param(_pickle, "adapter_model.bin: pickled weights are refused.*--allow-pickle", id="pickle"),
]


@pytest.mark.parametrize(("corrupt", "message"), BAD_ADAPTERS)
def test_bad_adapter_is_one_line_exit_2_nothing_written(capsys, tmp_path, bert_dir, bert_adapter, corrupt, message):
    adapter = _adapter_copy(bert_adapter, tmp_path / "adapter")
    corrupt(adapter)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", adapter, "-o", out)
    assert code == 2
    line = error_line(err)
    assert line.startswith("peftc: error: ")
    assert __import__("re").search(message, line), line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_allow_pickle_loads_with_weights_only(capsys, tmp_path, bert_dir, bert_adapter):
    adapter = _adapter_copy(bert_adapter, tmp_path / "adapter")
    _pickle(adapter)
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", adapter, "-o", tmp_path / "out", "--allow-pickle")
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "input_ids:batch,seq"], "expected name:dims:dtype"),
        (["--input", "input_ids:batch,seq:int99"], "unknown dtype 'int99'"),
        (["--target", "tflite"], "unknown target 'tflite'"),
        (["--max-rank", "8"], "apply to --swappable artifacts only"),
        (["--swappable", "--max-rank", "2"], "--max-rank 2 is below the rank 4 of a given adapter"),
    ],
    ids=["input-format", "input-dtype", "target", "max-rank-alone", "max-rank-too-small"],
)
def test_bad_options(capsys, tmp_path, bert_dir, bert_adapter, argv, message):
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", tmp_path / "out", *argv)
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "out").exists()


def test_swappable_compile_add_and_remove(capsys, tmp_path, bert_dir, bert_adapter):
    import models

    out = tmp_path / "out"
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "--swappable", "-o", out)
    assert code == 0, err
    other = models.make_lora(models.tiny_bert(), tmp_path / "other", target_modules=["key"])
    code, _, err = run(capsys, "add-adapter", out, "--adapter", other)
    assert code == 2 and "module 'encoder.layer.0.attention.self.key' has no slot" in error_line(err)
    same = models.make_lora(models.tiny_bert(), tmp_path / "same", seed=3, target_modules=["query"], r=2)
    code, stdout, err = run(capsys, "add-adapter", out, "--adapter", same, "--name", "q2")
    assert code == 0 and "added adapter 'q2'" in stdout, err
    code, stdout, _ = run(capsys, "inspect", out)
    assert "swappable: 11 LoRA slots of rank 4" in stdout and "add-adapter" in stdout
    code, stdout, _ = run(capsys, "remove-adapter", out, "--name", "q2")
    assert code == 0 and "removed adapter 'q2'" in stdout
    code, _, err = run(capsys, "remove-adapter", out, "--name", "q2")
    assert code == 2 and "no adapter named 'q2'" in error_line(err)


def test_missing_model(capsys, tmp_path, bert_adapter):
    code, _, err = run(capsys, "compile", tmp_path / "nope", "--adapter", bert_adapter, "-o", tmp_path / "out")
    assert code == 2 and "cannot load model" in error_line(err)


def test_existing_output_needs_force(capsys, tmp_path, bert_dir, bert_adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out)
    assert code == 2 and "already exists; pass --force" in error_line(err)
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out, "--force")
    assert code == 2 and "not a peftc artifact and not empty" in error_line(err)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty directory may be replaced
    assert run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out, "--force")[0] == 0
    assert (out / "manifest.json").exists()


def test_unwritable_output_dir(capsys, tmp_path, bert_dir, bert_adapter):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", blocker / "out")
    assert code == 2 and "cannot write to" in error_line(err)


def test_verification_failure_exits_1_with_table(capsys, tmp_path, bert_dir, bert_adapter, monkeypatch):
    import peftc.methods.lora.ops as lora

    real = lora.delta_weight
    monkeypatch.setattr(lora, "delta_weight", lambda a, b, s, layout: real(a, b, 2 * s, layout))
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", tmp_path / "out")
    assert code == 1
    assert "peftc: error: verification failed" in err and "FAIL" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(capsys, tmp_path, bert_adapter):
    code = main(
        ["--debug", "compile", str(tmp_path / "nope"), "--adapter", str(bert_adapter), "-o", str(tmp_path / "o")]
    )
    assert code == 2 and "Traceback" in capsys.readouterr().err


def test_inspect_of_a_non_artifact(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 2 and "manifest.json: missing" in error_line(err)
