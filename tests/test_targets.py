"""Every target behind one runner contract, and the AOTInductor target end to end.

One AOTInductor package is compiled for the whole module (a CPU compile takes ~30-40 s here) and
shared by the tests. Targets that cannot run on this machine skip with the reason in ``pytest -ra``.
"""

from __future__ import annotations

import models
import numpy as np
import pytest
import torch
from conftest import assert_outputs_close

import peftc
from peftc.backends.tensorrt import install as trt_install
from peftc.errors import InputError

SITES = ["query", "value"]
TRT_MODULE = trt_install.find_module()
DEVICE, NO_GPU = trt_install.build_device() if TRT_MODULE else trt_install.cuda_device()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = models.tiny_bert()
    return {
        "a": models.make_lora(model, root / "a", target_modules=SITES),
        "b": models.make_lora(model, root / "b", target_modules=SITES, seed=5),
    }


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, adapters):
    """The tiny BERT with LoRA ``a``: unmerged for ONNX; for AOTInductor swappable (``a`` by default,
    ``b`` beside it, a bank of 2), so one package compile also covers adapter slots in AOTI. The
    AOTI compile runs with Inductor's shared cache pointed at ``shared-cache``, which it must not use."""
    root = tmp_path_factory.mktemp("targets")
    model = models.tiny_bert()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "shared-cache"))
        aoti = peftc.compile(
            model, [adapters["a"], adapters["b"]], out=root / "aoti", target="aoti", swappable=True, multi_adapter=2
        )
    return {"onnx": peftc.compile(model, adapters["a"], out=root / "onnx", merge=False), "aoti": aoti}


def test_aoti_compiles_in_a_private_inductor_cache(artifacts):
    """Two compiles of one graph in one shared cache race on its metadata files (an empty JSON in
    the package); each compile gets its own cache, so the shared one stays untouched."""
    shared = artifacts["aoti"].path.parent / "shared-cache"
    assert not shared.exists() or not any(shared.rglob("*")), sorted(shared.rglob("*"))[:5]


def _target(name):
    if name == "trt":
        return pytest.param(name, marks=pytest.mark.skipif(DEVICE is None, reason=f"trt engine not built: {NO_GPU}"))
    if name == "aoti-cuda":
        return pytest.param(
            name, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="aoti cuda: torch sees no CUDA device")
        )
    return name


@pytest.fixture(scope="module")
def gpu_artifacts(tmp_path_factory, adapters):
    root = tmp_path_factory.mktemp("gpu")
    made = {}

    def get(name):
        if name not in made:
            target, options = {"trt": ("trt", {"refit": True}), "aoti-cuda": ("aoti", {"device": "cuda"})}[name]
            made[name] = peftc.compile(
                models.tiny_bert(), adapters["a"], out=root / name, target=target, merge=False, target_options=options
            )
        return made[name]

    return get


@pytest.mark.parametrize("target", ["onnx", "aoti", _target("trt"), _target("aoti-cuda")])
def test_runner_contract(target, artifacts, gpu_artifacts, adapters):
    """Same inputs, same output names, dtypes and values (within fp32 tolerance) on every target."""
    artifact = artifacts[target] if target in artifacts else gpu_artifacts(target)
    manifest = artifact.manifest
    assert manifest.status == "ok" and manifest.verification["passed"]
    runner = peftc.load(artifact.path)
    assert runner.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o["name"] for o in manifest.target["outputs"]] == ["last_hidden_state", "pooler_output"]
    reference = peftc.load(artifacts["onnx"].path)
    for batch, seq in [(1, 7), (3, 20)]:
        inputs = models.text_inputs(batch, seq)
        got = runner(**inputs)
        assert set(got) == {"last_hidden_state", "pooler_output"}
        assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in got.values())
        assert_outputs_close(got, reference(**inputs))
        numpy_in = runner(**{k: v.numpy() for k, v in inputs.items()})
        assert all(isinstance(v, np.ndarray) for v in numpy_in.values())
    with pytest.raises(InputError, match=r"missing \['attention_mask'\]"):
        runner(input_ids=np.zeros((1, 4), dtype=np.int64))


def test_aoti_manifest_maps_slot_constants(artifacts):
    target = artifacts["aoti"].manifest.target
    assert [f["path"] for f in target["files"]] == ["model.pt2", "adapters/a.safetensors", "adapters/b.safetensors"]
    assert target["device"] == "cpu" and target["slots"]["bank"] == 3
    assert target["outputs"][0] == {"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "seq", 32]}
    slot = "encoder.layer.0.attention.self.query.bank_A.slots"
    assert target["adapter_constants"][slot]["shape"] == [3, 4, 32]  # bank rows: base, then the adapters
    oracles = {c["oracle"] for c in artifacts["aoti"].manifest.verification["cases"]}
    assert {"base", "peft[a]", "peft[b]", "mixed batch"} <= oracles


def test_aoti_switches_a_b_a_without_recompiling(artifacts, adapters):
    runner = peftc.load(artifacts["aoti"].path)
    assert runner.adapters == ["a", "b"] and runner.adapter == "a"
    inputs = models.text_inputs(2, 11)
    first = runner(**inputs)
    with_b = runner(**inputs, adapter="b")
    assert_outputs_close(with_b, models.peft_outputs(models.tiny_bert(), adapters["b"], inputs))
    assert not torch.allclose(with_b["last_hidden_state"], first["last_hidden_state"])
    mixed = runner(**inputs, adapter=["b", None])
    assert torch.equal(mixed["last_hidden_state"][0], with_b["last_hidden_state"][0])
    again = runner(**inputs, adapter="a")
    assert all(torch.equal(first[k], again[k]) for k in first)  # slot values reloaded whole: bit-identical
    with pytest.raises(InputError, match="no adapter named 'c'"):
        runner(**inputs, adapter="c")


def test_aoti_bf16_within_its_budget(tmp_path, adapters):
    """The bf16 AOTInductor artifact (the CPU's AMX path): verified against the fp32 oracles within
    u·√(3·depth), and the same against PEFT's fp32 model here."""
    from peftc.precision import budget

    model = models.tiny_bert()
    artifact = peftc.compile(model, adapters["a"], out=tmp_path / "aoti", target="aoti", precision="bf16")
    precision = artifact.manifest.target["precision"]
    assert precision["compute"] == "bf16" and precision["budget"] == pytest.approx(budget("bf16", precision["depth"]))
    assert artifact.manifest.target["outputs"][0]["dtype"] == "bfloat16"
    inputs = models.text_inputs(3, 13)
    got = peftc.load(artifact.path)(**inputs)
    assert all(v.dtype == torch.float32 for v in got.values())  # bf16 outputs come back widened
    assert_outputs_close(got, models.peft_outputs(model, adapters["a"], inputs), rel=precision["budget"])
