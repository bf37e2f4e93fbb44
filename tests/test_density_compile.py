"""The DEFT passes in a compile (``peftc compile --prune-dead-neurons --skip-blocks``): the artifact against
PEFT's dense model, the ONNX graph's narrower MLP weights, a live neuron removed, an impossible budget,
and the refusals."""

from __future__ import annotations

import json

import models
import onnx
import pytest
import torch
from cli_run import error_line
from conftest import assert_outputs_close

import peftc
from peftc.cli import main
from peftc.density import compiled
from peftc.errors import UnsupportedError, VerificationError

INTERMEDIATE, DEAD = 48, 18
"""Widths no other tensor of the model has: 48 neurons per MLP, 18 of them dead, 30 kept."""
ACTS = [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]


def _relu_bert() -> torch.nn.Module:
    """A tiny ReLU BERT whose MLPs have ``DEAD`` neurons that never fire (weight row 0, bias -1: what DEFT
    training drives neurons towards), and whose second MLP contributes ~1e-8 of the output (skippable)."""
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=INTERMEDIATE,
        vocab_size=100, max_position_embeddings=40, hidden_act="relu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    dead = torch.arange(INTERMEDIATE) % 8 < 3
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight[dead] = 0.0
            layer.intermediate.dense.bias[dead] = -1.0
        model.encoder.layer[1].output.dense.weight.mul_(1e-8)
    return model


@pytest.fixture(scope="module")
def deft(tmp_path_factory):
    """The model (saved), a LoRA that changes it (attention and the first MLP's down projection), and the
    artifact compiled with both passes at the default budget."""
    root = tmp_path_factory.mktemp("deft-compile")
    model = _relu_bert()
    model.save_pretrained(str(root / "model"))
    targets = ["query", "value", "encoder.layer.0.output.dense"]
    adapter = models.make_lora(model, root / "lora", target_modules=targets)
    code = main(["compile", str(root / "model"), "--adapter", str(adapter), "-o", str(root / "out"),
                 "--prune-dead-neurons", "--skip-blocks", "--calibration-samples", "4", "--json"])  # fmt: skip
    assert code == 0
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    return {"root": root, "model": model, "adapter": adapter, "out": root / "out", "manifest": manifest}


def test_compiled_artifact_matches_dense_peft_within_the_recorded_error(deft):
    manifest = deft["manifest"]
    density = manifest["target"]["density"]
    assert density["max_error"] == 1e-5 and density["error"] <= 1e-5  # ReLU: removal is exact up to rounding
    kept = {(r["name"], r["pass"]) for r in density["layers"] if r["kept"]}
    assert kept == {(ACTS[0], "prune-dead-neurons"), (ACTS[1], "prune-dead-neurons"), (ACTS[1], "skip-blocks")}
    assert density["removed"] == DEAD + INTERMEDIATE and density["neurons"] == 2 * INTERMEDIATE
    assert manifest["verification"]["passed"]
    assert {c["oracle"] for c in manifest["verification"]["cases"]} == {"reference", "peft"}
    assert min(manifest["verification"]["adapter_effect"].values()) > 0.02  # the LoRA really changes the model
    runner = peftc.load(deft["out"])
    for shape, seed in (((2, 12), 31), ((1, 7), 32)):  # inputs neither the search nor verification saw
        inputs = models.text_inputs(*shape, seed=seed)
        assert_outputs_close(runner(**inputs), models.peft_outputs(deft["model"], deft["adapter"], inputs))


def test_onnx_mlp_weights_lose_the_removed_rows_and_columns(deft):
    shapes = [tuple(i.dims) for i in onnx.load(str(deft["out"] / "model.onnx")).graph.initializer]
    kept = INTERMEDIATE - DEAD
    assert not [s for s in shapes if INTERMEDIATE in s]  # no MLP tensor of the dense width is left
    # the first block's up weight, up bias and down weight, sliced; the skipped block has none
    assert sorted(s for s in shapes if kept in s) == sorted([(kept,), (32, kept), (kept, 32)])


def test_inspect_shows_the_density_table(deft, capsys):
    assert main(["inspect", str(deft["out"])]) == 0
    out = capsys.readouterr().out
    assert f"{DEAD + INTERMEDIATE} of {2 * INTERMEDIATE} MLP neurons removed" in out
    assert all(name in out for name in ACTS) and "skip-blocks" in out


def test_removing_a_live_neuron_fails_verification(deft, monkeypatch):
    real = compiled.kept

    def without_the_busiest(count):
        busiest = int(count.nonzero.argmax())
        return tuple(i for i in real(count) if i != busiest)

    monkeypatch.setattr(compiled, "kept", without_the_busiest)
    with pytest.raises(VerificationError, match=r"exceeds the budget .*rewritten alone\): encoder.layer.0"):
        peftc.compile(deft["model"], deft["adapter"], out=deft["root"] / "mutant", density=("prune-dead-neurons",),
                      calibration_samples=2)  # fmt: skip
    assert not (deft["root"] / "mutant").exists()


def test_impossible_budget_exits_1_naming_the_worst_layers(deft, capsys, tmp_path):
    model = _relu_bert()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(1e8)  # both blocks matter now
    model.save_pretrained(str(tmp_path / "model"))
    code = main(["compile", str(tmp_path / "model"), "--adapter", str(deft["adapter"]), "-o", str(tmp_path / "out"),
                 "--skip-blocks", "--max-error", "1e-4", "--calibration-samples", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "cannot meet the error budget 0.0001" in err
    assert all(name in err for name in ACTS)


def test_refusals_are_one_line_exit_2(deft, capsys, tmp_path):
    cases = [
        (["--sparse-mlp"], "--sparse-mlp"),
        (["--prune-dead-neurons", "--no-merge"], "--no-merge"),
    ]
    for flags, named in cases:
        code = main(["compile", str(deft["root"] / "model"), "--adapter", str(deft["adapter"]), "-o",
                     str(tmp_path / "out"), *flags])  # fmt: skip
        assert code == 2 and named in error_line(capsys.readouterr().err)
    no_mlp = models.mlp()
    with pytest.raises(UnsupportedError, match="no MLP block"):
        peftc.compile(no_mlp, models.make_lora(no_mlp, tmp_path / "mlp-lora", target_modules=["lin0"]),
                      out=tmp_path / "mlp", inputs=models.MLP_INPUTS, density=("skip-blocks",))  # fmt: skip
