"""The README's recipes for adding a method and a target work as written.

Each example block of the README is written to a temporary module, registered with the one line the
README names (``METHODS`` / ``BACKENDS``), and compiled end to end; the numbers are checked against an
expectation computed here without peftc.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import models
import numpy as np
import pytest
import torch
from conftest import assert_outputs_close
from safetensors.torch import save_file

import peftc
from peftc.backends import BACKENDS
from peftc.errors import InputError, UnsupportedError
from peftc.methods import registry

README = Path(__file__).resolve().parents[1] / "README.md"
SITES = ["encoder.layer.0.attention.output.dense", "encoder.layer.1.output.dense"]


def _example(name: str) -> str:
    """The python block that follows ``<!-- example: name -->`` in the README."""
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"no example {name!r} in README.md"
    return match.group(1)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The README's toy method and toy target, imported as modules (each registers itself once)."""
    root = tmp_path_factory.mktemp("examples")
    (root / "peftc_toy_method.py").write_text(_example("toy-method"))
    (root / "peftc_toy_target.py").write_text(_example("toy-target"))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        return importlib.import_module("peftc_toy_method"), importlib.import_module("peftc_toy_target")


def _toy_adapter(path: Path, scales: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    config = {"peft_type": "TOY_SCALE", "target_modules": SITES, "base_model_name_or_path": None}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {f"base_model.model.{m}.toy_scale": s for m, s in scales.items()}, str(path / "adapter_model.safetensors")
    )
    return path


def _scaled(model: torch.nn.Module, scales: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The toy method applied by hand: each module's weight rows and bias scaled."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for path, scale in scales.items():
            module = scaled.get_submodule(path)
            module.weight.mul_(scale[:, None])
            module.bias.mul_(scale)
    return scaled


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in peftc.ir.flatten_named(model(**inputs)).items()}


def test_a_new_method_compiles_merged_and_unmerged(examples, tmp_path, monkeypatch):
    method, _ = examples
    monkeypatch.setattr(registry, "METHODS", [*registry.METHODS, method.METHOD])  # the README's one line
    model = models.tiny_bert()
    generator = torch.Generator().manual_seed(3)
    scales = {m: 4 * torch.randn(32, generator=generator) for m in SITES}
    adapter = _toy_adapter(tmp_path / "toy", scales)
    inputs = models.text_inputs(2, 9)
    expected, base = _run(_scaled(model, scales), inputs), _run(model, inputs)
    assert np.abs(expected["last_hidden_state"] - base["last_hidden_state"]).max() > 0.1  # the adapter matters
    for merge in (True, False):
        artifact = peftc.compile(model, adapter, out=tmp_path / f"out-{merge}", merge=merge)
        passes = {p["name"]: p["stats"] for p in artifact.manifest.pipeline}
        assert passes["insert-sites"]["sites"] == 4  # weight and bias of both modules
        assert (passes["merge"]["merged"] == 4) if merge else "merge" not in passes
        kept = artifact.manifest.target["adapter_initializers"]  # unmerged: the scales, named after their keys
        assert sorted(kept.values()) == (
            [] if merge else sorted(f"adapter_model.safetensors:base_model.model.{m}.toy_scale" for m in SITES)
        )
        assert_outputs_close(peftc.load(artifact.path)(**inputs), expected)


def test_a_new_method_refuses_what_does_not_fit(examples, tmp_path, monkeypatch):
    method, _ = examples
    monkeypatch.setattr(registry, "METHODS", [*registry.METHODS, method.METHOD])
    adapter = _toy_adapter(tmp_path / "toy", {SITES[0]: torch.ones(5), SITES[1]: torch.ones(32)})
    with pytest.raises(InputError, match=r"toy_scale: shape \[5\] does not match .* \[d_out=32\]"):
        peftc.compile(models.tiny_bert(), adapter, out=tmp_path / "out")


def test_a_new_target_compiles_verifies_and_runs(examples, tmp_path, monkeypatch, bert_adapter):
    _, target = examples
    monkeypatch.setitem(BACKENDS, "eager", "peftc_toy_target:EagerBackend")  # the README's one line
    model = models.tiny_bert()
    inputs = models.text_inputs(3, 11)
    expected = models.peft_outputs(model, bert_adapter, inputs)
    for merge in (True, False):
        artifact = peftc.compile(model, bert_adapter, out=tmp_path / f"out-{merge}", target="eager", merge=merge)
        assert artifact.manifest.status == "ok" and artifact.manifest.target["files"][0]["path"] == target.FILE
        assert {c["oracle"] for c in artifact.manifest.verification["cases"]} == {"reference", "peft"}
        runner = peftc.load(artifact.path)
        assert isinstance(runner.backend_runner, target.EagerRunner)
        assert_outputs_close(runner(**inputs), expected)
    with pytest.raises(UnsupportedError, match="target 'eager' cannot build --swappable artifacts"):
        peftc.compile(model, bert_adapter, out=tmp_path / "swap", target="eager", swappable=True)
