"""The TensorRT target: settings as data, the refit map, TensorRT's real ONNX parser, refusals.

What runs where:

* everywhere: profile/precision/refit settings, the refit map (checked numerically by feeding the
  recomputed weights to onnxruntime as initializer overrides), the refusals;
* with ``tensorrt`` or ``tensorrt_rtx`` installed (CI installs ``tensorrt-rtx-cu13``): the ONNX parser
  on every ONNX the target emits for the test models;
* with a GPU: engine build, run and refit. Without one these tests skip, and the reason is in the
  ``pytest -ra`` summary.
"""

from __future__ import annotations

from collections import Counter

import models
import numpy as np
import pytest
import torch
from conftest import adapt, assert_outputs_close, export
from safetensors.torch import load_file

import peftc
from peftc.backends.tensorrt import engine as trt_engine
from peftc.backends.tensorrt import install as trt_install
from peftc.backends.tensorrt.refit import BASE_FILE, RefitMap, refit_weights
from peftc.backends.tensorrt.settings import (
    DimProfile,
    TensorRTSettings,
    check_precision,
    dim_profiles,
    input_profiles,
    parse_profile,
)
from peftc.errors import BackendUnavailable, InputError, UnsupportedError
from peftc.loaders.inputs import from_transformers

TRT_MODULE = trt_install.find_module()
needs_parser = pytest.mark.skipif(
    TRT_MODULE is None,
    reason=f"TensorRT parser not installed: neither tensorrt nor tensorrt_rtx ({trt_install.INSTALL_HINT})",
)
DEVICE, NO_GPU = trt_install.build_device() if TRT_MODULE else trt_install.cuda_device()
needs_gpu = pytest.mark.skipif(
    DEVICE is None or TRT_MODULE is None, reason=f"engine not built: {NO_GPU or 'no TensorRT'}"
)
SITES = ["query", "value"]


# -- settings as data ---------------------------------------------------------------------------


def test_parse_profile_and_its_errors():
    assert parse_profile("seq:1,128,512") == DimProfile("seq", 1, 128, 512)
    with pytest.raises(InputError, match=r"need 0 <= min <= opt <= max and max >= 1, got min=9, opt=9, max=4"):
        parse_profile("seq:9,9,4")
    with pytest.raises(InputError, match="expected name:min,opt,max"):
        parse_profile("seq:1,2")
    with pytest.raises(InputError, match="more than once"):
        TensorRTSettings(profiles=(parse_profile("seq:1,2,3"), parse_profile("seq:1,2,4")))
    with pytest.raises(InputError, match="--precision 'int3'"):
        TensorRTSettings.from_options({"precision": "int3"})


def test_profiles_derived_from_dynamic_dims_and_overridden():
    signature = from_transformers(models.tiny_bert())  # batch unbounded, seq 1..64
    dims = dim_profiles(signature)
    assert dims == {"batch": DimProfile("batch", 1, 1, 32), "seq": DimProfile("seq", 1, 64, 64)}
    dims = dim_profiles(signature, [parse_profile("seq:2,16,48")])
    assert dims["seq"] == DimProfile("seq", 2, 16, 48)
    shapes = input_profiles(signature, dims)
    assert [(p.name, p.min, p.opt, p.max) for p in shapes] == [
        ("input_ids", (1, 2), (1, 16), (32, 48)),
        ("attention_mask", (1, 2), (1, 16), (32, 48)),
        ("token_type_ids", (1, 2), (1, 16), (32, 48)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokens:1,2,3", "no dynamic dim 'tokens'; the model's are batch, seq"),
        ("seq:1,16,128", r"outside the range the model was traced with \(seq 1..64\)"),
        ("seq:1,8,16", "verification runs seq=33; widen the range"),
    ],
)
def test_profile_refusals(text, message):
    with pytest.raises(InputError, match=message):
        dim_profiles(from_transformers(models.tiny_bert()), [parse_profile(text)])


def test_precision_the_device_cannot_run():
    check_precision("fp16", (7, 5), "Tesla T4")
    check_precision("bf16", (9, 0), "NVIDIA H200")
    with pytest.raises(UnsupportedError, match=r"--precision bf16: Tesla T4 \(compute capability 7.5\) cannot run it"):
        check_precision("bf16", (7, 5), "Tesla T4")


H100 = trt_install.Device("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.skipif(TRT_MODULE != "tensorrt_rtx", reason="the compute-capability list is TensorRT-RTX's")
def test_tensorrt_rtx_names_the_gpus_it_cannot_build_for():
    """Seen on an H100: TensorRT-RTX 1.7 fails inside Myelin for every target ("target_sm '90' does not
    have arch kind assigned") and its engines do not deserialize on 9.0. peftc says so before building."""
    assert trt_install.unbuildable(trt_install.Device("NVIDIA GeForce RTX 4090", (8, 9))) == ""
    assert trt_install.unbuildable(trt_install.Device("NVIDIA RTX PRO 6000", (12, 0))) == ""
    why = trt_install.unbuildable(H100)
    assert why.startswith("tensorrt_rtx 1.7") and "7.5, 8.0, 8.6, 8.9, 12.0, 12.1; NVIDIA H100 80GB HBM3 is 9.0" in why
    assert "--target aoti --device cuda" in why


@needs_parser
def test_a_gpu_tensorrt_cannot_build_for_gets_the_verified_onnx_and_the_reason(tmp_path, bert_adapter, monkeypatch):
    monkeypatch.setattr(trt_install, "cuda_device", lambda: (H100, ""))
    monkeypatch.setattr(trt_install, "unbuildable", lambda device, module=None: f"cannot build for {device.name}")

    def build(*args, **kwargs):
        raise AssertionError("no engine build may start on a GPU TensorRT cannot build for")

    monkeypatch.setattr(trt_engine, "build", build)
    artifact = peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", target="trt")
    info = artifact.manifest.target["tensorrt"]
    assert (
        info["engine"] is None and info["engine_missing"] == "engine not built: cannot build for NVIDIA H100 80GB HBM3"
    )
    assert artifact.manifest.target["verified_with"] == "onnx" and artifact.manifest.verification["passed"]
    with pytest.raises(BackendUnavailable, match=r"engine not built: cannot build for NVIDIA H100"):
        peftc.load(artifact.path)


def test_refit_modes():
    assert TensorRTSettings().refit_mode is None
    assert TensorRTSettings(refit=True).refit_mode == "refit"
    assert TensorRTSettings(strip_weights=True).refit_mode == "refit_identical"


# -- refusals through compile and the CLI -------------------------------------------------------


def test_no_tensorrt_module_is_refused_before_any_work(tmp_path, bert_adapter, monkeypatch):
    monkeypatch.setattr(trt_install, "find_module", lambda: None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'peftc\[tensorrt\]'.*nothing was built.*--target onnx"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", target="trt")
    assert not list(tmp_path.iterdir())


def test_cli_bad_profile_is_one_line_and_writes_nothing(capsys, tmp_path, bert_dir, bert_adapter):
    from peftc.cli import main

    out = tmp_path / "out"
    argv = ["compile", str(bert_dir), "--adapter", str(bert_adapter), "-o", str(out), "--target", "trt"]
    code = main([*argv, "--profile", "seq:64,16,1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--profile seq:64,16,1: need 0 <= min <= opt <= max and max >= 1" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_target_options_on_a_target_without_them(tmp_path, bert_adapter):
    with pytest.raises(UnsupportedError, match=r"target 'onnx' takes no target options \(--refit\)"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", target_options={"refit": True})


def test_quantized_layers_are_refused_before_any_export(tmp_path):
    """NF4 and GPTQ/AWQ layers lower to onnxruntime contrib ops TensorRT's parser cannot read: refused naming
    the layer, one line, nothing written; LLM.int8 layers (standard ONNX ops) are not refused."""
    from peftc import ir
    from peftc.backends import LowerRequest
    from peftc.backends.tensorrt import TensorRTBackend
    from peftc.backends.tensorrt.quantized import refuse_contrib_layers
    from peftc.loaders.inputs import parse_inputs
    from peftc.quant import bnb
    from peftc.quant.modules import Bnb4Linear, Int8Linear

    packed, absmax = bnb.quantize_4bit(torch.randn(16, 64), "nf4", 64)
    nf4 = Bnb4Linear(packed, absmax, bnb.code_table("nf4"), 64, "nf4", (16, 64), None)
    int8 = Int8Linear(torch.randint(-127, 128, (16, 64), dtype=torch.int8), torch.rand(16) + 0.5, None)
    signature = parse_inputs(["input:batch,64:float32"])

    def traced(*layers):
        module = torch.nn.Sequential(*layers)
        return ir.trace(module, signature.example(signature.trace_sizes()), signature.dynamic_shapes())

    refuse_contrib_layers(traced(int8))
    program = traced(int8, torch.nn.ReLU(), torch.nn.Linear(16, 64), nf4)
    with pytest.raises(UnsupportedError) as caught:
        TensorRTBackend().lower(LowerRequest(program, signature), tmp_path, lambda message: None)
    message = str(caught.value)
    assert message.startswith("--target trt: 3 is a bitsandbytes 4-bit layer") and "\n" not in message
    assert "com.microsoft.MatMulBnb4" in message and "--target onnx" in message
    assert "compile merged with --merge-policy auto or float" in message  # what dequantizes them
    assert not list(tmp_path.iterdir())


# -- the parser on every ONNX the target emits, and the refit map -------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-adapters")
    model = models.tiny_bert()
    return {
        "a": models.make_lora(model, root / "a", target_modules=SITES),
        "b": models.make_lora(model, root / "b", target_modules=SITES, seed=5),
        "r8": models.make_lora(model, root / "r8", target_modules=SITES, r=8, seed=6),
    }


@pytest.fixture(scope="module")
def trt_artifacts(tmp_path_factory, adapters):
    """LoRA merged (refittable) and unmerged, compiled by ``peftc.compile`` for ``--target trt``."""
    if TRT_MODULE is None:
        pytest.skip(f"TensorRT parser not installed ({trt_install.INSTALL_HINT})")
    root = tmp_path_factory.mktemp("trt")
    return {
        merge: peftc.compile(
            models.tiny_bert(),
            adapters["a"],
            out=root / f"merge-{merge}",
            target="trt",
            merge=merge,
            target_options={"refit": True},
        )
        for merge in (True, False)
    }


def _matmuls(report):
    return report["layer_types"].get("MATRIX_MULTIPLY", 0)


@needs_parser
def test_compiled_artifacts_record_the_parse_and_not_run(trt_artifacts):
    merged, unmerged = (trt_artifacts[m].manifest for m in (True, False))
    for manifest in (merged, unmerged):
        info = manifest.target["tensorrt"]
        assert manifest.status == "ok" and manifest.verification["passed"]
        assert info["module"] == TRT_MODULE and manifest.versions[TRT_MODULE] == info["version"]
        assert [i["name"] for i in info["parse"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [(o["name"], o["dtype"]) for o in info["parse"]["outputs"]] == [
            ("last_hidden_state", "float32"),
            ("pooler_output", "float32"),
        ]
        assert info["parse"]["inputs"][0]["shape"] == [-1, -1]
        assert info["profile"][0] == {"name": "input_ids", "min": [1, 1], "opt": [1, 64], "max": [32, 64]}
        if DEVICE is None:
            assert manifest.target["verified_with"] == "onnx" and info["engine"] is None
            assert [n["reason"] for n in manifest.not_run if n["what"].startswith("tensorrt")] == [
                f"engine not built: {NO_GPU}"
            ]
            assert {f["path"] for f in manifest.target["files"]} == {"model.onnx", BASE_FILE}
    # One thin down-projection per site on top of the merged network's matmuls (as in the ONNX).
    sites = 2 * len(SITES)
    assert _matmuls(unmerged.target["tensorrt"]["parse"]) == _matmuls(merged.target["tensorrt"]["parse"]) + sites


@needs_parser
def test_refit_map_merged_and_unmerged(trt_artifacts):
    merged = trt_artifacts[True].manifest.target["tensorrt"]["refit_map"]
    unmerged = trt_artifacts[False].manifest.target["tensorrt"]["refit_map"]
    assert not merged["refused"] and not unmerged["refused"]
    assert {e["weight"] for e in merged["entries"]} == {
        f"encoder.layer.{i}.attention.self.{s}.weight" for i in range(2) for s in SITES
    }
    q = next(e for e in merged["entries"] if e["weight"] == "encoder.layer.0.attention.self.query.weight")
    key = "base_model.model.encoder.layer.0.attention.self.query"
    assert q["sites"] == [
        {
            "op": "lora_linear",
            "module": "encoder.layer.0.attention.self.query",
            "adapter": "a",
            "tensors": [
                f"adapter_model.safetensors:{key}.lora_A.weight",
                f"adapter_model.safetensors:{key}.lora_B.weight",
                None,
            ],
            "scalars": [2.0, False],
        }
    ]
    assert {e["weight"]: e["source"] for e in unmerged["entries"]} == trt_artifacts[False].manifest.target[
        "adapter_initializers"
    ]


def _adapter_tensors(path):
    return {"a": load_file(str(path / "adapter_model.safetensors"))}


@needs_parser
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_refit_weights_give_the_new_adapter_in_onnxruntime(trt_artifacts, adapters, merge):
    """The refit path without TensorRT: base + ΔW(B) as initializer overrides computes PEFT's model with B."""
    from peftc.backends.tensorrt import onnx_with_weights

    artifact = trt_artifacts[merge]
    refit_map = RefitMap.from_json(artifact.manifest.target["tensorrt"]["refit_map"])
    base = load_file(str(artifact.path / BASE_FILE))
    inputs = models.text_inputs(2, 11)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # the raw ONNX takes every input
    feeds = {k: v.numpy() for k, v in inputs.items()}
    weights_b = refit_weights(refit_map, base, _adapter_tensors(adapters["b"]))
    got = onnx_with_weights(artifact.path / "model.onnx", weights_b, feeds)
    assert_outputs_close(got, models.peft_outputs(models.tiny_bert(), adapters["b"], inputs))
    # Back to A: the weights come from base + ΔW(A) alone, bit-identical to what was compiled.
    import onnx
    from onnx import numpy_helper

    weights_a = refit_weights(refit_map, base, _adapter_tensors(adapters["a"]))
    compiled = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(str(artifact.path / "model.onnx")).graph.initializer
    }
    for name, value in weights_a.items():
        assert np.array_equal(value.numpy(), compiled[name]), name


@needs_parser
def test_refit_with_mismatched_slots_is_refused(trt_artifacts, adapters):
    artifact = trt_artifacts[True]
    refit_map = RefitMap.from_json(artifact.manifest.target["tensorrt"]["refit_map"])
    base = load_file(str(artifact.path / BASE_FILE))
    wrong = _adapter_tensors(adapters["r8"])
    refit_weights(refit_map, base, wrong)  # merged: a rank-8 ΔW still has the weight's shape
    unmerged = RefitMap.from_json(trt_artifacts[False].manifest.target["tensorrt"]["refit_map"])
    with pytest.raises(InputError, match=r"lora_A.a: the new adapter gives shape \[8, 32\], the engine has \[4, 32\]"):
        refit_weights(unmerged, {}, wrong)
    missing = {"a": {k: v for k, v in wrong["a"].items() if "layer.1" not in k}}
    with pytest.raises(InputError, match=r"adapter 'a': key '.*layer.1.*' missing"):
        refit_weights(refit_map, base, missing)


@needs_parser
def test_refit_reads_the_base_weights_and_the_onnx_checked_when_it_uses_them(trt_artifacts, adapters, tmp_path):
    """Refitting reads the base weights and the ONNX long after ``peftc.load``: each is checked against the
    manifest as it is read, so a file replaced in between is refused, not used (the engine itself is
    stubbed: building one needs a GPU)."""
    import shutil

    from peftc.backends.tensorrt import TensorRTRunner

    class Engine:
        def refit(self, weights):
            self.weights = weights

        def run(self, feeds):
            raise AssertionError("the check must refuse the ONNX before running the engine")

    path = shutil.copytree(trt_artifacts[True].path, tmp_path / "art")
    target = trt_artifacts[True].manifest.target
    runner = object.__new__(TensorRTRunner)
    runner.directory, runner.target, runner.engine = path, target, Engine()
    runner.refit_map = RefitMap.from_json(target["tensorrt"]["refit_map"])
    runner.refit_adapter(_adapter_tensors(adapters["b"]), verify=False)
    assert runner.engine.weights
    (path / "model.onnx").write_bytes((path / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(InputError, match=r"model.onnx: sha256 differs from the manifest"):
        runner.refit_adapter(_adapter_tensors(adapters["a"]))
    shutil.copy(trt_artifacts[False].path / BASE_FILE, path / BASE_FILE)  # another artifact's base weights
    with pytest.raises(InputError, match=rf"{BASE_FILE}: sha256 differs from the manifest"):
        runner.refit_adapter(_adapter_tensors(adapters["a"]), verify=False)


@needs_parser
def test_no_engine_artifact_is_refused_unless_onnx_is_asked_for(trt_artifacts):
    if DEVICE is not None:
        pytest.skip("this machine builds engines")
    path = trt_artifacts[True].path
    with pytest.raises(BackendUnavailable, match=r"no TensorRT engine in this artifact \(engine not built: no GPU"):
        peftc.load(path)
    runner = peftc.load(path, runtime="onnx")
    inputs = models.text_inputs(1, 5)
    assert_outputs_close(
        runner(**inputs),
        models.peft_outputs(models.tiny_bert(), trt_artifacts[True].manifest.adapters[0]["path"], inputs),
    )
    with pytest.raises(InputError, match="cannot be run with 'aoti'"):
        peftc.load(path, runtime="aoti")


@needs_parser
@pytest.mark.parametrize(
    "method",
    ["dora", "ia3", "fp16"],
    ids=["dora-unmerged", "ia3-weight-site-unmerged", "lora-merged-fp16"],
)
def test_parser_reads_other_methods_and_precisions(tmp_path, method):
    """Lowering only (no verification compile): the parser takes each ONNX, names kept, types as asked."""
    from peft import IA3Config

    from peftc.backends import LowerRequest
    from peftc.backends.tensorrt import TensorRTBackend
    from peftc.passes import PassContext, PassManager, pipelines

    model = models.tiny_bert()
    signature = from_transformers(model)
    if method == "ia3":
        config = IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
        adapter = models.make_adapter(model, tmp_path / "a", config)
    else:
        adapter = models.make_lora(model, tmp_path / "a", target_modules=SITES, use_dora=method == "dora")
    reference = adapt(export(model), adapter)
    program = PassManager(pipelines.optimize(merge=method == "fp16")).run(reference, PassContext())[0]
    options = {"precision": "fp16"} if method == "fp16" else {}
    (tmp_path / "out").mkdir()
    lowered = TensorRTBackend(options).lower(
        LowerRequest(program, signature, reference), tmp_path / "out", lambda m: None
    )
    info = lowered.info["tensorrt"]
    parse = info["parse"]
    assert [o["name"] for o in parse["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert all(o["dtype"] == "float32" for o in parse["outputs"])  # fp32 I/O at every precision
    assert parse["layers"] > 100 and parse["layer_types"]["NORMALIZATION"] == 5
    refit = info["refit_map"]
    if method == "dora":  # the factored norm is computed at compile time: refit refuses it by name
        assert {r["reason"].split(" (")[0] for r in refit["refused"]} == {"computed at compile time"}
        assert len(refit["entries"]) == 2 * 2 * len(SITES) and len(refit["refused"]) == 2 * len(SITES)
    elif method == "ia3":
        assert len(refit["entries"]) == 2 * 4 and not refit["refused"]  # key, value, both output.dense
    else:
        assert info["onnx"] == "model.fp16.onnx" and lowered.outputs[0]["compute_dtype"] == "float16"
        assert parse["layer_types"]["CAST"] > 2 and len(refit["entries"]) == 2 * len(SITES)


@needs_parser
def test_fp16_copy_computes_the_model_within_fp16_tolerance(tmp_path, bert_program, bert_adapter):
    """The cast network, run by onnxruntime on CPU (TensorRT needs a GPU), against the fp32 reference."""
    from peftc.backends import LowerRequest
    from peftc.backends.onnx import OnnxBackend
    from peftc.backends.ort import OrtRunner
    from peftc.backends.tensorrt.precision import cast_model

    signature = from_transformers(models.tiny_bert())
    reference = adapt(bert_program, bert_adapter)
    OnnxBackend().lower(LowerRequest(reference, signature), tmp_path, lambda m: None)
    half = OrtRunner(cast_model(tmp_path / "model.onnx", "fp16"))
    inputs = models.text_inputs(3, 20)
    expected = {k: v.detach().numpy() for k, v in dict(reference.module()(**inputs)).items()}
    got = half.run({k: v.numpy() for k, v in inputs.items()})
    assert_outputs_close(got, expected, rel=5e-3)  # fp16: 2^-11 roundoff through two layers
    worst = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    assert worst > 1e-6  # really computed in fp16


# -- with a GPU: build, run, refit ----------------------------------------------------------------


@needs_gpu
def test_engine_builds_runs_and_refits_a_b_a(trt_artifacts, adapters):
    runner = peftc.load(trt_artifacts[True].path)
    engine = runner.backend_runner
    inputs = models.text_inputs(2, 11)
    first = runner(**inputs)
    assert_outputs_close(first, models.peft_outputs(models.tiny_bert(), adapters["a"], inputs))
    engine.refit_adapter(_adapter_tensors(adapters["b"]))
    assert_outputs_close(runner(**inputs), models.peft_outputs(models.tiny_bert(), adapters["b"], inputs))
    engine.refit_adapter(_adapter_tensors(adapters["a"]))
    again = runner(**inputs)
    assert all(torch.equal(first[k], again[k]) for k in first)


@needs_gpu
def test_fp16_engine_with_profile_and_cache(tmp_path, adapters):
    artifact = peftc.compile(
        models.tiny_bert(),
        adapters["a"],
        out=tmp_path / "out",
        target="trt",
        target_options={"precision": "fp16", "profile": ["seq:1,16,64"], "cache_dir": str(tmp_path / "cache")},
    )
    assert artifact.manifest.target["tensorrt"]["engine"] == "model.engine"
    assert any((tmp_path / "cache").iterdir())
    assert Counter(c["oracle"] for c in artifact.manifest.verification["cases"])["reference"] == 3
