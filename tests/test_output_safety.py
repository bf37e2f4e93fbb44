"""The output directory: replaced only when allowed, atomically, and nothing left behind by a kill."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import models
import pytest
from conftest import REPO

import peftc
from peftc.artifact import Manifest, rename, temp
from peftc.artifact.writer import ArtifactWriter
from peftc.cli import main
from peftc.errors import InputError


def run(capsys, *argv) -> tuple[int, str]:
    """Exit code and the one error line (asserting there is exactly one, without a traceback)."""
    code = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[peftc")]
    assert len(err) <= 1 and "Traceback" not in "".join(err), err
    return code, err[0] if err else ""


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".peftc-" in p.name]


# -- what --force may replace -------------------------------------------------------------------------


@pytest.mark.parametrize("contents", [{}, {"user.txt": "mine"}], ids=["empty", "with-a-file"])
def test_directory_appearing_during_the_compile_is_left_untouched(
    capsys, tmp_path, bert_dir, bert_adapter, monkeypatch, contents
):
    import peftc.driver.pipeline as pipeline

    out = tmp_path / "out"
    real = pipeline.open_runner

    def appear_then_open(*args, **kwargs):
        out.mkdir()
        for name, text in contents.items():
            (out / name).write_text(text)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "open_runner", appear_then_open)
    code, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out)
    assert code == 2 and f"{out}: appeared while compiling; left untouched" in err
    assert tree(out) == {k: v.encode() for k, v in contents.items()}
    assert leftovers(tmp_path) == []


def test_force_replaces_an_artifact(capsys, tmp_path, bert_dir, bert_adapter):
    out = tmp_path / "out"
    assert run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out, "--seed", "1")[0] == 0
    assert run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out, "--seed", "2", "--force")[0] == 0
    assert peftc.load(out).manifest.options["seed"] == 2 and leftovers(tmp_path) == []


def test_force_refuses_what_is_not_an_artifact(tmp_path):
    nested = tmp_path / "project"
    (nested / "src").mkdir(parents=True)
    (nested / "src" / "main.py").write_text("print('mine')")
    (nested / "manifest.json").write_text('{"name": "a web app manifest"}')
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    file = tmp_path / "file"
    file.write_text("a file")
    for out, match in [
        (nested, "not a peftc artifact and not empty"),
        (link, "is a symbolic link"),
        (file, "exists and is not a directory"),
    ]:
        with pytest.raises(InputError, match=match):
            ArtifactWriter(out, force=True)
    assert tree(nested) == {"manifest.json": b'{"name": "a web app manifest"}', "src/main.py": b"print('mine')"}
    assert link.is_symlink() and file.read_text() == "a file" and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["the-adapter", "holds-the-adapter", "inside-the-model"])
def test_force_refuses_the_inputs_own_directories(capsys, tmp_path, bert_dir, bert_adapter, where):
    model = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    adapter = Path(shutil.copytree(bert_adapter, tmp_path / "inputs" / "adapter"))
    before = tree(tmp_path)
    out = {"the-adapter": adapter, "holds-the-adapter": adapter.parent, "inside-the-model": model / "out"}[where]
    code, err = run(capsys, "compile", model, "--adapter", adapter, "-o", out, "--force")
    assert code == 2 and f"{out}: is, holds or lies inside the compile's input" in err
    assert tree(tmp_path) == before


def test_output_may_not_be_the_working_directory_or_above(capsys, tmp_path, bert_dir, bert_adapter, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", work, "..", "sub/../"):
        code, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "-o", out, "--force")
        assert code == 2 and "is the current directory or above it" in err, (out, err)
    with pytest.raises(InputError, match="is the current directory or above it"):
        ArtifactWriter("/", force=True)
    assert work.is_dir() and list(work.iterdir()) == [] and leftovers(tmp_path) == []


def test_a_long_output_name_is_taken_and_one_the_file_system_refuses_is_one_line(capsys, tmp_path, bert_adapter):
    """A 250-byte name is a valid file name: its temporary directory cuts it, and finds its own stale ones;
    a 300-byte one is refused before any work, naming the limit (not a bare "File name too long")."""
    out = tmp_path / ("o" * 250)
    directory, inner = temp.staging(out, "artifact", str(out))
    assert inner.is_dir() and len(directory.path.name.encode()) < 255 and directory.path.name.startswith(".ooo")
    directory.release()  # its run is over: the next compile to the same output removes it
    assert temp.stale_beside(out) == [directory.path] and temp.stale_beside(tmp_path / ("o" * 249)) == []
    code, err = run(capsys, "compile", "x", "--adapter", bert_adapter, "-o", tmp_path / ("o" * 300))
    assert code == 2 and "its name is 300 bytes long; the file system takes names of at most 255" in err


# -- the commit: old or new, never neither ----------------------------------------------------------


class Killed(BaseException):
    """The process dies here: nothing after it runs (no except, no cleanup)."""


def _manifest(tag: str) -> Manifest:
    fields = {f.name: (1 if f.name == "schema_version" else None) for f in dataclasses.fields(Manifest)}
    files = [
        {"path": path, "sha256": "", "bytes": 0} for path in ("weights.bin", "sub/more.bin")
    ]  # what --force replaces
    return Manifest(**{**fields, "status": "ok", "peftc_version": tag, "warnings": [tag], "target": {"files": files}})


def _write(out: Path, tag: str, *, force: bool = False) -> ArtifactWriter:
    writer = ArtifactWriter(out, force=force)
    (writer.tmp / "weights.bin").write_bytes(tag.encode() * 100)
    (writer.tmp / "sub").mkdir()
    (writer.tmp / "sub" / "more.bin").write_bytes(tag.encode())
    return writer


def _expected(tmp_path: Path, tag: str) -> dict[str, bytes]:
    writer = _write(tmp_path / f"expected-{tag}", tag)
    writer.commit(_manifest(tag))
    return tree(tmp_path / f"expected-{tag}")


FS_STEPS = [
    (os, "rename"),
    (os, "replace"),
    (os, "unlink"),
    (os, "rmdir"),
    (shutil, "rmtree"),
    (rename, "_call"),
    (Path, "write_text"),
]


def _fail_at(monkeypatch, step: int, error: type[BaseException]) -> list[str]:
    """Make the ``step``-th filesystem call raise ``error`` before it acts; return the calls seen."""
    calls = []
    for owner, name in FS_STEPS:
        real = getattr(owner, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == step + 1:
                raise error(f"injected at {_name}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)
    return calls


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "create"])
def test_commit_interrupted_at_every_step_leaves_old_or_new(tmp_path, monkeypatch, existing, fallback):
    """A kill (renameat2) or a failing call (both) at each filesystem step of the commit leaves the
    complete old artifact or the complete new one at ``out``; the temporary directory is then cleaned.
    (Without renameat2 a kill between the two renames would leave neither: only failures are injected.)"""
    expected = {"old": _expected(tmp_path, "old"), "new": _expected(tmp_path, "new")}
    if fallback:
        monkeypatch.setattr(rename, "_renameat2", None)
    errors = [OSError] if fallback else [Killed, OSError]
    out = tmp_path / "work" / "out"
    outcomes = set()
    for error in errors:
        for step in range(80):
            shutil.rmtree(out.parent, ignore_errors=True)
            out.parent.mkdir()
            if existing:
                _write(out, "old").commit(_manifest("old"))
            writer = _write(out, "new", force=True)
            with monkeypatch.context() as patch:
                calls = _fail_at(patch, step, error)
                try:
                    writer.commit(_manifest("new"))
                except (Killed, OSError):
                    if error is OSError:
                        writer.abort()  # what the pipeline's ``finally`` does
                finally:
                    writer._dir.release()  # the process ends: its lock goes
            state = tree(out) if out.exists() else None
            assert state in ([expected["old"], expected["new"]] if existing else [None, expected["new"]]), (step, calls)
            outcomes.add("old" if state == expected["old"] else "new" if state else "none")
            for name in leftovers(out.parent):  # later: a directory whose removal was cut short has aged
                os.utime(out.parent / name, (0, 0))
            temp.clean(out)
            assert os.listdir(out.parent) == (["out"] if state else []), (
                step,
                error,
                calls,
                [os.listdir(out.parent / n) for n in leftovers(out.parent)],
            )
            if len(calls) <= step:
                break  # the commit ran to the end without reaching the injected step
    assert outcomes == ({"old", "new"} if existing else {"none", "new"})


# -- kills, SIGTERM and peftc clean --------------------------------------------------------------------


def _start_compile(tmp_path: Path, bert_dir: Path, bert_adapter: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "peftc.cli", "compile", bert_dir, "--adapter", bert_adapter, "-o", out]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers(tmp_path), "the compile never created its temporary directory"
    time.sleep(0.5)  # well inside the compile
    return process, out


def test_sigterm_cleans_up_like_sigint(tmp_path, bert_dir, bert_adapter):
    process, out = _start_compile(tmp_path, bert_dir, bert_adapter)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err.decode()
    assert "peftc: interrupted (SIGTERM)" in err.decode() and "Traceback" not in err.decode()
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigkill_leaves_a_temporary_directory_that_clean_removes(capsys, tmp_path, bert_dir, bert_adapter):
    process, out = _start_compile(tmp_path, bert_dir, bert_adapter)
    process.kill()
    process.communicate(timeout=60)
    [left] = leftovers(tmp_path)
    lookalike = tmp_path / ".out.peftc-mine"  # the name, without peftc's marker: not peftc's
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine")
    live = temp.TempDir(tmp_path, "out")  # a run still going: its lock is held
    assert main(["clean", str(out)]) == 0
    assert capsys.readouterr().out == f"removed {tmp_path / left}\n"
    assert sorted(leftovers(tmp_path)) == sorted([lookalike.name, live.path.name])
    assert (lookalike / "notes.txt").read_text() == "mine"
    assert main(["clean", str(tmp_path)]) == 0 and "nothing to clean" in capsys.readouterr().out
    live.release()  # that run is killed too: the next compile to the same -o removes what it left
    ArtifactWriter(out).abort()
    assert leftovers(tmp_path) == [lookalike.name] and not out.exists()


# -- add-adapter / remove-adapter ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swappable(tmp_path_factory, bert_dir, bert_adapter):
    root = tmp_path_factory.mktemp("swappable")
    other = models.make_lora(models.tiny_bert(), root / "other", seed=5, target_modules=["query", "value"])
    return peftc.compile(bert_dir, [bert_adapter, other], out=root / "out", swappable=True, oracle=False).path


def test_remove_adapter_keeps_the_manifest_mode_and_removes_killed_changes_files(swappable, tmp_path):
    from peftc.swap import remove_adapter

    artifact = Path(shutil.copytree(swappable, tmp_path / "artifact"))
    (artifact / "manifest.json").chmod(0o644)
    # What a killed add-adapter leaves: its adapter file and manifest, both temporary and unlisted.
    (artifact / "adapters" / ".late.peftc-tmp.onnx_adapter").write_bytes(b"half")
    (artifact / ".manifest.json.peftc-tmp-x1y2").write_text("{")
    remove_adapter(artifact, "other")
    assert (artifact / "manifest.json").stat().st_mode & 0o777 == 0o644
    listed = {f["path"] for f in peftc.load(artifact).manifest.target["files"]}
    assert set(tree(artifact)) == listed | {"manifest.json"}


def test_failed_add_adapter_leaves_no_file_behind(swappable, tmp_path, monkeypatch):
    import peftc.swap.manage as manage

    artifact = Path(shutil.copytree(swappable, tmp_path / "artifact"))
    extra = models.make_lora(models.tiny_bert(), tmp_path / "extra", seed=9, target_modules=["value"])
    before = tree(artifact)

    def fail(directory, manifest):
        raise KeyboardInterrupt  # interrupted after the adapter file was moved into place

    monkeypatch.setattr(manage, "_commit", fail)
    with pytest.raises(KeyboardInterrupt):
        manage.add_adapter(artifact, extra, oracle=False)
    assert tree(artifact) == before
