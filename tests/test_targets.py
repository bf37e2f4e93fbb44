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
from safetensors.torch import load_file

import peftc
from peftc.backends.tensorrt import engine as trt_engine
from peftc.errors import InputError

SITES = ["query", "value"]
TRT_MODULE = trt_engine.find_module()
DEVICE, NO_GPU = trt_engine.cuda_device()


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
    """The tiny BERT with LoRA ``a``, unmerged, for each target this machine can build."""
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for target in ("onnx", "aoti"):
        out[target] = peftc.compile(models.tiny_bert(), adapters["a"], out=root / target, target=target, merge=False)
    return out


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
    assert runner.input_names == ["input_ids", "attention_mask"]
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


def test_aoti_manifest_maps_adapter_constants(artifacts):
    target = artifacts["aoti"].manifest.target
    assert [f["path"] for f in target["files"]] == ["model.pt2"]
    assert target["device"] == "cpu" and target["swappable"] is True
    assert target["outputs"][0] == {"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "seq", 32]}
    sources = {k: v["source"] for k, v in target["adapter_constants"].items()}
    assert sources == artifacts["onnx"].manifest.target["adapter_initializers"]  # same names as the ONNX
    assert len(sources) == 2 * 2 * len(SITES)
    assert target["adapter_constants"]["encoder.layer.0.attention.self.query.lora_A.a"]["shape"] == [4, 32]


def _constants(target, adapter_dir):
    """Constant name → tensor of the adapter in ``adapter_dir``, through the manifest's key map."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {name: tensors[c["source"].split(":", 1)[1]] for name, c in target["adapter_constants"].items()}


def test_aoti_swap_a_b_a_without_recompiling(artifacts, adapters):
    artifact = artifacts["aoti"]
    runner = peftc.load(artifact.path)
    swap = runner.backend_runner.swap
    inputs = models.text_inputs(2, 11)
    first = runner(**inputs)
    swap(_constants(artifact.manifest.target, adapters["b"]))
    with_b = runner(**inputs)
    assert_outputs_close(with_b, models.peft_outputs(models.tiny_bert(), adapters["b"], inputs))
    assert not torch.allclose(with_b["last_hidden_state"], first["last_hidden_state"])
    swap(_constants(artifact.manifest.target, adapters["a"]))
    again = runner(**inputs)
    assert all(torch.equal(first[k], again[k]) for k in first)  # bit-identical


def test_aoti_swap_refusals(artifacts, adapters):
    runner = peftc.load(artifacts["aoti"].path).backend_runner
    name = "encoder.layer.0.attention.self.query.lora_A.a"
    with pytest.raises(
        InputError, match=r"lora_A.a: new tensor is \[8, 32\] float32, the artifact's slot is \[4, 32\]"
    ):
        runner.swap({name: torch.zeros(8, 32)})
    with pytest.raises(InputError, match=r"not adapter constants of this artifact: \['encoder.layer.0.attention"):
        runner.swap({"encoder.layer.0.attention.self.query.weight": torch.zeros(32, 32)})
    runner.swappable = False  # as for a merged artifact
    with pytest.raises(InputError, match="no swappable adapter tensors"):
        runner.swap({name: torch.zeros(4, 32)})
