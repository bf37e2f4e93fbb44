"""An artifact is data: peftc never runs code it names, checks every file it reads when it reads it,
and reads only the files its manifest lists, inside the artifact (issue: hardening, items 1-3).

Each test doctors a real artifact the way an attacker or an accident would, and checks the outcome.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import models
import numpy as np
import pytest
from conftest import assert_outputs_close

import peftc
from peftc.cli import main
from peftc.errors import InputError

SITES = ["query", "value"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, bert_dir):
    """A tiny BERT from a copy of its HF directory, compiled unmerged, and a swappable artifact with
    adapters ``a`` and ``b`` (onnx: cheap)."""
    root = tmp_path_factory.mktemp("trust")
    model_dir = root / "model"
    shutil.copytree(bert_dir, model_dir)
    model = models.tiny_bert()
    a = models.make_lora(model, root / "a", target_modules=SITES)
    b = models.make_lora(model, root / "b", target_modules=SITES, seed=5)
    plain = peftc.compile(str(model_dir), a, out=root / "plain", merge=False).path
    swap = peftc.compile(model, [a, b], out=root / "swap", swappable=True).path
    return {"root": root, "model_dir": model_dir, "a": a, "b": b, "plain": plain, "swap": swap, "model": model}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path: Path, edit) -> None:
    manifest = path / "manifest.json"
    data = json.loads(manifest.read_text())
    edit(data)
    manifest.write_text(json.dumps(data))


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 1. no code from an artifact ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "module"])
def test_verify_never_runs_a_factory_the_manifest_names(tmp_path, capsys, built, kind):
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    body = f"open({str(marker)!r}, 'w').write('x')\ndef model():\n    return None\n"
    if kind == "file":
        (evil / "payload.py").write_text(body)
        spec = str(evil / "payload.py") + ":model"
    else:
        (evil / "peftc_payload_pkg").mkdir()
        (evil / "peftc_payload_pkg" / "__init__.py").write_text(body)
        spec = "peftc_payload_pkg:model"
    art = _copy(built["plain"], tmp_path / "art")
    swap = _copy(built["swap"], tmp_path / "swap")
    for path in (art, swap):
        _edit_manifest(path, lambda d: (d["model"].update(spec=spec), d.update(workdir=str(evil))))
    for argv in (("verify", art), ("add-adapter", swap, "--adapter", built["b"], "--name", "x")):
        code, _, err = _cli(capsys, *argv)
        errors = [line for line in err.splitlines() if line.startswith("peftc: error")]
        assert code == 2 and "Traceback" not in err and len(errors) == 1, err
        assert "never runs code" in err and "--model" in err
    assert not marker.exists() and "peftc_payload_pkg" not in sys.modules
    assert str(evil) not in sys.path


def test_a_model_given_on_the_command_line_does_not_import_from_the_manifest_workdir(tmp_path, capsys, built):
    """``--model pkg:fn`` is the user's code, resolved from the working directory, never from a
    directory the manifest names."""
    evil = tmp_path / "evil"
    (evil / "peftc_shadow_pkg").mkdir(parents=True)
    marker = tmp_path / "ran"
    (evil / "peftc_shadow_pkg" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    art = _copy(built["plain"], tmp_path / "art")
    _edit_manifest(art, lambda d: d.update(workdir=str(evil)))
    code, _, err = _cli(capsys, "verify", art, "--model", "peftc_shadow_pkg:model")
    assert code == 2 and "cannot import 'peftc_shadow_pkg'" in err
    assert not marker.exists()


def test_verify_checks_the_model_files_before_loading_them(tmp_path, capsys, built):
    model_dir = _copy(built["model_dir"], tmp_path / "model")
    art = _copy(built["plain"], tmp_path / "art")
    _edit_manifest(art, lambda d: d["model"].update(spec=str(model_dir)))
    assert _cli(capsys, "verify", art)[0] == 0  # the same files: verified
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    code, _, err = _cli(capsys, "verify", art)
    assert code == 2 and f"{model_dir / 'config.json'}: missing or changed since the artifact was built" in err
    shutil.copy(built["model_dir"] / "config.json", model_dir / "config.json")
    shutil.copy(model_dir / "model.safetensors", model_dir / "extra.safetensors")
    code, _, err = _cli(capsys, "verify", art)
    assert code == 2 and "extra.safetensors: not among the model files the artifact was built from" in err


# -- 2. files checked when used; only listed files, inside the artifact ------------------------


def test_an_adapter_file_replaced_after_load_is_refused_not_used(tmp_path, built):
    art = _copy(built["swap"], tmp_path / "art")
    runner = peftc.load(art)
    inputs = models.text_inputs(2, 6)
    expected_b = runner(adapter="b", **inputs)
    files = {a["name"]: art / a["slot_file"] for a in runner.manifest.adapters}
    shutil.copy(files["b"], files["a"])  # after load, before adapter a is first read
    with pytest.raises(InputError, match=r"sha256 differs from the manifest; the file was modified"):
        runner(adapter="a", **inputs)
    assert_outputs_close(runner(adapter="b", **inputs), expected_b, rel=0)
    with pytest.raises(InputError, match="the artifact was modified"):
        peftc.load(art)


def test_an_adapter_file_is_read_once_from_the_checked_bytes(tmp_path, built):
    """After the first call the adapter's values are kept: replacing the file changes nothing."""
    art = _copy(built["swap"], tmp_path / "art")
    runner = peftc.load(art)
    inputs = models.text_inputs(1, 5)
    first = runner(adapter="a", **inputs)
    expected = models.peft_outputs(built["model"], built["a"], inputs)
    assert_outputs_close(first, expected)
    files = {a["name"]: art / a["slot_file"] for a in runner.manifest.adapters}
    shutil.copy(files["b"], files["a"])
    np.testing.assert_array_equal(runner(adapter="a", **inputs)["last_hidden_state"], first["last_hidden_state"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/hostname", "files must be plain paths inside the artifact"),
        ("../outside.onnx", "files must be plain paths inside the artifact"),
        ("", "files must be plain paths inside the artifact"),
        ("link.onnx", "a symbolic link"),
    ],
)
def test_listed_files_must_be_plain_paths_inside_the_artifact(tmp_path, built, path, message):
    art = _copy(built["plain"], tmp_path / "art")
    (tmp_path / "outside.onnx").write_bytes((art / "model.onnx").read_bytes())
    (art / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    _edit_manifest(art, lambda d: d["target"]["files"].append({"path": path, "bytes": 1, "sha256": "0" * 64}))
    with pytest.raises(InputError, match=message):
        peftc.load(art)


def test_files_the_runner_reads_must_be_listed(tmp_path, built):
    art = _copy(built["plain"], tmp_path / "art")
    _edit_manifest(
        art, lambda d: d["target"].update(files=[f for f in d["target"]["files"] if f["path"] != "model.onnx"])
    )
    with pytest.raises(InputError, match=r"names 'model.onnx' but does not list it in target.files"):
        peftc.load(art)
    swap = _copy(built["swap"], tmp_path / "swap")
    _edit_manifest(swap, lambda d: d["adapters"][0].update(slot_file="../../a.onnx_adapter"))
    with pytest.raises(InputError, match=r"names '../../a.onnx_adapter' but does not list it"):
        peftc.load(swap)


# -- 3. inspect says modified -------------------------------------------------------------------


def test_inspect_reports_a_modified_artifact(tmp_path, capsys, built):
    art = _copy(built["plain"], tmp_path / "art")
    code, out, _ = _cli(capsys, "inspect", art)
    assert code == 0 and "status=ok" in out and "modified: " not in out
    with (art / "model.onnx").open("ab") as f:
        f.write(b"\0")
    code, out, _ = _cli(capsys, "inspect", art)
    assert code == 1 and "status=modified" in out and "status=ok" not in out
    assert f"modified: {art / 'model.onnx'}: sha256 differs from the manifest" in out
    code, out, _ = _cli(capsys, "inspect", art, "--json")
    integrity = json.loads(out)["integrity"]
    assert code == 1 and integrity["status"] == "modified" and "model.onnx" in integrity["problems"][0]


# -- Hub ids from the local cache (no network) --------------------------------------------------


def _cache(root: Path, repo_id: str, source: Path) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/…}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, capsys, monkeypatch, built):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _cache(cache, "acme/tiny-bert", built["model_dir"])
    _cache(cache, "acme/tiny-lora.v2", built["a"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    art = peftc.compile("acme/tiny-bert", "acme/tiny-lora.v2", out=tmp_path / "out")
    assert art.manifest.adapters[0]["name"] == "tiny_lora_v2"
    inputs = models.text_inputs(1, 5)
    assert_outputs_close(peftc.load(art.path)(**inputs), models.peft_outputs(built["model"], built["a"], inputs))
    code, _, err = _cli(capsys, "compile", "acme/missing", "--adapter", built["a"], "-o", tmp_path / "x")
    assert code == 2 and "model 'acme/missing': not a path here and not in the local Hugging Face cache" in err
    assert not (tmp_path / "x").exists()


def test_a_timm_spec_is_taken_only_with_its_recorded_safetensors_weights(tmp_path):
    """timm's code is the installed library's; the weights file the spec names is data, checked first."""
    from types import SimpleNamespace

    from peftc.driver.sources import model_spec
    from peftc.hashing import sha256_file

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    spec = "timm:vit_tiny_patch16_224@w.safetensors"
    manifest = SimpleNamespace(
        model={"spec": spec, "files": {"w.safetensors": sha256_file(weights)}}, workdir=str(tmp_path)
    )
    assert model_spec(manifest) == spec
    weights.write_bytes(b"other weights")
    with pytest.raises(InputError, match=r"w.safetensors: missing or changed since the artifact was built"):
        model_spec(manifest)
    manifest.model["spec"] = "timm:vit_tiny_patch16_224@w.pth"
    with pytest.raises(InputError, match="needs pickled weights; pass the model yourself"):
        model_spec(manifest)
