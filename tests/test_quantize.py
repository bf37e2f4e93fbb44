"""Integer precisions (``peftc/driver/quantize.py``, ``peftc/backends/onnx/quantize.py``): every layer's
sensitivity measured, the most sensitive kept in float until the budget holds, the artifact verified
against the fp32 reference and PEFT within that budget."""

from __future__ import annotations

import math

import models
import numpy as np
import pytest
import torch
from conftest import assert_outputs_close
from safetensors.numpy import save_file

import peftc
from peftc.cli import PRECISIONS as CLI_PRECISIONS
from peftc.cli import main
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.precision import PRECISIONS, QUANTIZED, budget

QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulNBits"}


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    sites = ["q_proj", "v_proj", "down_proj"]
    return models.make_lora(models.tiny_llama(), tmp_path_factory.mktemp("llama") / "a", target_modules=sites)


@pytest.fixture(scope="module")
def conv_adapter(tmp_path_factory):
    sites = ["conv1", "conv2", "conv3", "head"]
    return models.make_lora(models.convnet(), tmp_path_factory.mktemp("conv") / "a", target_modules=sites)


@pytest.fixture(scope="module")
def loose_int8(tmp_path_factory, bert_adapter):
    """Tiny BERT at int8 with a budget every layer meets (the layer search's per-layer errors, read by
    two tests)."""
    out = tmp_path_factory.mktemp("loose-int8") / "out"
    return peftc.compile(models.tiny_bert(), bert_adapter, out=out, precision="int8", max_error=1.0)


def _quantization(artifact):
    return artifact.manifest.target["precision"]["quantization"]


def _verified_within_budget(artifact):
    precision = artifact.manifest.target["precision"]
    cases = artifact.manifest.verification["cases"]
    assert {c["oracle"] for c in cases} == {"reference", "peft"}, "fp32 oracles only: no eager int8 exists"
    for case in cases:
        for out in case["outputs"]:
            assert out["tol_rel"] == precision["budget"] and out["max_rel"] <= precision["budget"], out
    return precision


def test_budget_is_half_a_step_per_rounded_operand():
    """u = 1/(2·(2^(bits-1)-1)) of the group's largest magnitude, two operands per weighted op."""
    assert budget("int8", 24) == pytest.approx(math.sqrt(48) / 254)
    assert budget("int4", 6) == pytest.approx(math.sqrt(12) / 14)
    assert set(QUANTIZED) <= set(PRECISIONS) and tuple(PRECISIONS) == CLI_PRECISIONS


@pytest.mark.parametrize("precision", ["int8", "int8-weight", "int4", "int8-static"])
def test_tiny_bert_in_integer_precisions(tmp_path, bert_adapter, precision):
    """Each precision within a user's budget of 10 % (tiny BERT's 32-wide random layers lose more to
    rounding than the formats' default budgets allow: see the impossible-budget test)."""
    model = models.tiny_bert()
    artifact = peftc.compile(model, bert_adapter, out=tmp_path / "out", precision=precision, max_error=0.1)
    precision_record = _verified_within_budget(artifact)
    assert precision_record["budget"] == 0.1 and precision_record["budget_from"] == "--max-error"
    quantization = _quantization(artifact)
    assert quantization["quantized"] > 0 and quantization["error"] <= precision_record["budget"]
    assert QUANTIZED_OPS & set(artifact.manifest.target["op_counts"])
    modules = {layer["module"] for layer in quantization["layers"]}
    assert "encoder.layer.1.intermediate.dense" in modules
    inputs = models.text_inputs(2, 9)
    got = peftc.load(artifact.path)(**inputs)
    assert_outputs_close(got, models.peft_outputs(model, bert_adapter, inputs), rel=precision_record["budget"])


def test_kept_layers_are_the_most_sensitive_and_the_fewest_that_fit(tmp_path, bert_adapter, loose_int8):
    """With a budget between quantizing every layer and quantizing only the least sensitive one, some
    layers stay in float: the most sensitive, and no more than the budget needs."""
    loose = _quantization(loose_int8)
    everything = loose["search"][0]["error"]
    least = min(layer["error_alone"] for layer in loose["layers"])
    assert least < everything
    middle = (least + everything) / 2
    artifact = peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "b", precision="int8", max_error=middle)
    _verified_within_budget(artifact)
    quantization = _quantization(artifact)
    assert [layer["error_alone"] for layer in quantization["layers"]] == [
        layer["error_alone"] for layer in loose["layers"]
    ]
    layers = quantization["layers"]
    kept = [layer for layer in layers if layer["precision"] == "fp32"]
    quantized = [layer for layer in layers if layer["precision"] == "int8"]
    assert kept and quantized
    assert min(layer["error_alone"] for layer in kept) >= max(layer["error_alone"] for layer in quantized)
    search = {step["kept_float"]: step["error"] for step in quantization["search"]}
    assert search[len(kept)] <= middle < search[len(kept) - 1] and quantization["error"] == search[len(kept)]
    counts = artifact.manifest.target["op_counts"]
    matmuls = [layer for layer in quantized if layer["op"] in ("MatMul", "Gemm")]
    assert counts.get("MatMulInteger", 0) == len(matmuls)


def test_a_loose_budget_quantizes_every_layer(tmp_path, bert_adapter):
    artifact = peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="int4", max_error=1.0)
    quantization = _quantization(artifact)
    assert quantization["kept_float"] == 0 and [s["kept_float"] for s in quantization["search"]] == [0]
    assert artifact.manifest.target["op_counts"]["MatMulNBits"] == len(quantization["layers"]) == 6
    assert "MatMul" not in artifact.manifest.target["op_counts"]


@pytest.mark.parametrize("merge", [True, False])
def test_tiny_llama_int8_merged_and_unmerged(tmp_path, llama_adapter, merge):
    model = models.tiny_llama()
    artifact = peftc.compile(model, llama_adapter, out=tmp_path / "out", precision="int8", merge=merge)
    _verified_within_budget(artifact)
    modules = {layer["module"] for layer in _quantization(artifact)["layers"]}
    assert any("q_proj" in m for m in modules) and any("down_proj" in m for m in modules)
    if not merge:  # the adapter's own matmuls are layers too
        assert artifact.manifest.target["adapter_initializers"]
    assert _quantization(artifact)["quantized"] > 0


def test_conv_net_int8_static_quantizes_convolutions(tmp_path, conv_adapter):
    model = models.convnet()
    inputs = list(models.CONVNET_INPUTS)
    artifact = peftc.compile(
        model, conv_adapter, out=tmp_path / "out", inputs=inputs, precision="int8-static", max_error=0.05
    )
    _verified_within_budget(artifact)
    layers = _quantization(artifact)["layers"]
    assert [layer["op"] for layer in layers] == ["Conv", "Conv", "Conv", "Gemm"]
    assert any(layer["precision"] == "int8-static" for layer in layers if layer["op"] == "Conv")
    assert artifact.manifest.target["op_counts"]["QuantizeLinear"] > 0
    x = torch.randn(2, 3, 8, 8)
    got = peftc.load(artifact.path)(x=x)
    expected = models.peft_outputs(model, conv_adapter, {"x": x})
    assert_outputs_close(got, expected, rel=artifact.manifest.target["precision"]["budget"])


def test_calibration_file_is_used_and_recorded(tmp_path, conv_adapter):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32))
    artifact = peftc.compile(
        models.convnet(), conv_adapter, out=tmp_path / "out", inputs=list(models.CONVNET_INPUTS),
        precision="int8-static", calibration=tmp_path / "calib.npz",
    )  # fmt: skip
    record = _quantization(artifact)["calibration"]
    assert record["source"].endswith("calib.npz") and record["rows"] == 20 and record["batches"] == 3
    assert len(record["sha256"]) == 64
    command = artifact.manifest.command
    assert command is None or command[command.index("--calibration") + 1].endswith("calib.npz")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("attention_mask"), r"missing inputs \['attention_mask'\]"),
        (lambda d: d.update(extra=np.zeros((4, 12))), r"unexpected \['extra'\]"),
        (lambda d: d.update(input_ids=np.zeros((4,), np.int64)), r"'input_ids' has shape \[4\], the model takes"),
        (lambda d: d.update(input_ids=np.zeros((4, 12), np.float32)), "'input_ids' is float32, the model takes int64"),
        (lambda d: d.update(attention_mask=np.ones((3, 12), np.int64)), "every array needs the same number of rows"),
    ],
    ids=["missing", "extra", "rank", "dtype", "rows"],
)
def test_a_bad_calibration_file_is_refused_naming_the_input(tmp_path, bert_adapter, edit, message):
    data = {name: np.ones((4, 12), np.int64) for name in ("input_ids", "attention_mask")}
    edit(data)
    save_file(data, str(tmp_path / "calib.safetensors"))
    with pytest.raises(InputError, match=r"--calibration .*calib.safetensors: " + message):
        peftc.compile(
            models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="int8",
            calibration=tmp_path / "calib.safetensors",
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_unreadable_calibration_files_are_refused(tmp_path, bert_adapter):
    compile_with = lambda path: peftc.compile(  # noqa: E731
        models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="int8", calibration=path
    )
    with pytest.raises(InputError, match="calib.npz: no such file"):
        compile_with(tmp_path / "calib.npz")
    (tmp_path / "calib.pt").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match=r"calib.pt: give a .safetensors or .npz file"):
        compile_with(tmp_path / "calib.pt")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.npz: cannot read it"):
        compile_with(tmp_path / "bad.npz")


def test_an_impossible_budget_fails_naming_the_most_sensitive_layers(tmp_path, bert_adapter):
    with pytest.raises(
        VerificationError,
        match=r"--precision int8 cannot meet the error budget 1e-06 on the calibration inputs: .* layers.*: \w",
    ):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="int8", max_error=1e-6)
    assert not (tmp_path / "out").exists()


def test_mutation_quantizing_every_layer_regardless_exceeds_the_budget(tmp_path, bert_adapter, loose_int8, monkeypatch):
    """A search that ignored its kept layers (quantizing sensitive layers against the budget) must fail
    verification: the budget is checked on the artifact, not taken from the search."""
    from peftc.backends.onnx import quantize

    tight = 1.05 * min(layer["error_alone"] for layer in _quantization(loose_int8)["layers"])
    honest = peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "honest", precision="int8", max_error=tight)
    assert _quantization(honest)["kept_float"] > 0
    real = quantize.quantize

    def ignoring_keep(src, dst, precision, keep, calibration, cache, only=None):
        final = "peftc-quantize-" not in str(dst)  # the search measures honestly; the artifact ignores it
        return real(src, dst, precision, () if final else keep, calibration, cache, only)

    monkeypatch.setattr(quantize, "quantize", ignoring_keep)
    with pytest.raises(VerificationError, match=r"vs (reference|peft).*the layer search met .* calibration batches"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", precision="int8", max_error=tight)


def test_integer_precisions_are_refused_where_they_cannot_be_built(tmp_path, bert_adapter):
    with pytest.raises(
        UnsupportedError,
        match=r"--precision int4: target 'aoti' computes in fp32, bf16, fp16, int8, int8-static; "
        r"weight-only int8/int4 have no fast AOTInductor CPU kernel.*--target onnx",
    ):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "a", target="aoti", precision="int4")
    with pytest.raises(UnsupportedError, match="--precision int8-weight: target 'aoti'"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "e", target="aoti", precision="int8-weight")
    from peftc.backends.aoti import AotiBackend

    assert "int8" not in AotiBackend({"device": "cuda"}).capabilities.precisions
    with pytest.raises(UnsupportedError, match="--precision int4 with --swappable: adapter slots are float"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "b", precision="int4", swappable=True)
    with pytest.raises(InputError, match="--calibration and --calibration-samples apply to --precision int8"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "c", calibration_samples=4)
    with pytest.raises(InputError, match="--calibration-samples 0: give at least 1"):
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "d", precision="int8", calibration_samples=0)


def test_a_model_with_nothing_to_quantize_is_refused(tmp_path):
    """MatMulNBits needs K a multiple of its block: the 6-wide head of the conv net has none."""
    adapter = models.make_lora(models.convnet(), tmp_path / "a", target_modules=["head"])
    with pytest.raises(UnsupportedError, match="--precision int4: target 'onnx' finds no layer"):
        peftc.compile(
            models.convnet(), adapter, out=tmp_path / "out", inputs=list(models.CONVNET_INPUTS), precision="int4"
        )


def test_cli_quantizes_and_inspect_shows_the_layer_table(capsys, tmp_path, bert_dir, bert_adapter):
    out = tmp_path / "out"
    flags = ["--precision", "int8", "--max-error", "0.1", "--calibration-samples", "16"]
    code = main(["compile", str(bert_dir), "--adapter", str(bert_adapter), "-o", str(out), *flags])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "precision int8 (quantize; checkpoint fp32), error budget" in shown
    assert "encoder.layer.1.intermediate.dense" in shown and "error quantized alone" in shown
    assert main(["verify", str(out)]) == 0, capsys.readouterr().err  # rebuilt oracles, the recorded budget
    with pytest.raises(SystemExit) as exit:
        main(
            ["compile", str(bert_dir), "--adapter", str(bert_adapter), "-o", str(tmp_path / "x"), "--precision", "int9"]
        )
    assert exit.value.code == 2 and "invalid choice: 'int9'" in capsys.readouterr().err


# --- --target aoti: torchao PT2E + Inductor's oneDNN int8 kernels (``peftc/backends/aoti/quantize.py``)


@pytest.fixture(scope="module")
def aoti_static_bert(tmp_path_factory, bert_adapter):
    out = tmp_path_factory.mktemp("aoti-int8") / "out"
    return peftc.compile(
        models.tiny_bert(), bert_adapter, out=out, target="aoti", precision="int8-static", calibration_samples=16
    )


def test_aoti_int8_static_runs_int8_kernels_within_budget(aoti_static_bert, bert_adapter):
    artifact = aoti_static_bert
    precision = _verified_within_budget(artifact)
    quantization = _quantization(artifact)
    layers = quantization["layers"]
    assert [layer["module"] for layer in layers][:3] == [
        f"encoder.layer.0.attention.self.{m}" for m in ("query", "key", "value")
    ]
    assert {layer["op"] for layer in layers} == {"linear"} and len(layers) == 13  # 12 encoder linears + pooler
    quantized = sum(layer["precision"] == "int8-static" for layer in layers)
    assert quantized == quantization["quantized"] > 0
    assert artifact.manifest.target["int8_kernels"]["qlinear"] == quantized  # Inductor fused every q/dq pair
    inputs = models.text_inputs(3, 11)
    got = peftc.load(artifact.path)(**inputs)
    assert_outputs_close(got, models.peft_outputs(models.tiny_bert(), bert_adapter, inputs), rel=precision["budget"])


def test_aoti_search_trials_model_the_compiled_kernels(aoti_static_bert, bert_adapter):
    """The layer search runs the converted program eagerly; the compiled int8 kernels must compute the
    same (else the search would choose layers for a different artifact): on the search's own
    calibration inputs, the package's error against PEFT is the search's, to a tenth of the budget."""
    from peftc.driver.quantize import _error, calibration
    from peftc.loaders.inputs import InputSignature

    manifest = aoti_static_bert.manifest
    quantization = _quantization(aoti_static_bert)
    signature = InputSignature.from_json(manifest.target["signature"])
    feeds = calibration(None, quantization["calibration"]["batches"], signature, manifest.options["seed"]).feeds
    runner = peftc.load(aoti_static_bert.path)
    tensors = [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in feeds]
    expected = [
        {k: np.asarray(v) for k, v in models.peft_outputs(models.tiny_bert(), bert_adapter, t).items()} for t in tensors
    ]
    got = [{k: np.asarray(v) for k, v in runner(**t).items()} for t in tensors]
    budget_ = manifest.target["precision"]["budget"]
    assert abs(_error(expected, got) - quantization["error"]) <= 0.1 * budget_


@pytest.mark.parametrize("merge", [True, False])
def test_aoti_int8_dynamic_on_llama_keeps_the_adapter_branch_in_float(tmp_path, llama_adapter, merge):
    model = models.tiny_llama()
    artifact = peftc.compile(
        model, llama_adapter, out=tmp_path / "out", target="aoti", precision="int8", merge=merge, calibration_samples=8
    )
    precision = _verified_within_budget(artifact)
    layers = _quantization(artifact)["layers"]
    assert len(layers) == 14 and all("lora" not in layer["module"] for layer in layers)  # 7 linears x 2 layers
    assert artifact.manifest.target["int8_kernels"]["qlinear"] == _quantization(artifact)["quantized"] > 0
    inputs = models.text_inputs(2, 7)
    got = peftc.load(artifact.path)(**inputs)
    assert_outputs_close(got, models.peft_outputs(model, llama_adapter, inputs), rel=precision["budget"])


def test_aoti_int8_static_conv_net_quantizes_2d_convolutions(tmp_path, conv_adapter):
    """X86's quantizer takes conv2d and linear: the Conv1d stays in float and is no layer."""
    artifact = peftc.compile(
        models.convnet(), conv_adapter, out=tmp_path / "out", inputs=list(models.CONVNET_INPUTS), target="aoti",
        precision="int8-static", max_error=0.05, calibration_samples=16,
    )  # fmt: skip
    _verified_within_budget(artifact)
    layers = {layer["module"]: layer for layer in _quantization(artifact)["layers"]}
    assert list(layers) == ["conv1", "conv2", "head"]
    assert [layers[m]["op"] for m in layers] == ["conv2d", "conv2d", "linear"]
    convs = sum(layers[m]["precision"] == "int8-static" for m in ("conv1", "conv2"))
    assert artifact.manifest.target["int8_kernels"]["qconv"] == convs > 0


def test_aoti_mutation_a_write_that_ignores_the_kept_layers_fails_verification(tmp_path, llama_adapter, monkeypatch):
    """Quantizing the layers the search kept in float breaks tiny LLaMA's default int8-static budget:
    the artifact is verified, not trusted to the search."""
    from peftc.backends.aoti.quantize import AotiQuantizer

    real = AotiQuantizer.write
    monkeypatch.setattr(AotiQuantizer, "write", lambda self, keep, calibration: real(self, (), calibration))
    with pytest.raises(VerificationError, match=r"the layer search met .* calibration batches"):
        peftc.compile(
            models.tiny_llama(), llama_adapter, out=tmp_path / "out", target="aoti", precision="int8-static",
            calibration_samples=16,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
