"""``--prune-dead-neurons`` beyond ReLU: a gated SiLU LLaMA with MLP biases compiled (its quiet neurons'
mean folded into the down bias) against PEFT's dense model, with narrower ONNX MLP weights; a GELU BERT
through the same eager search the compile runs, against the dense model, and refused with a live neuron
removed or without the fold (mutations; a compile whose search keeps nothing exits 1 naming the worst
layers, tested on ReLU in ``test_density_compile.py``); bad thresholds (exit 2)."""

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
from peftc.density import exploit, modules
from peftc.density.blocks import find_blocks
from peftc.density.measure import measure
from peftc.density.measure import run as run_model

INTERMEDIATE, DEAD, BUDGET, TAU = 48, 18, 1e-4, 1e-3
"""48 neurons per MLP (a width no other tensor has), 18 quiet ones; the budget and threshold used here
(the tiny LLaMA's live MLP values are themselves ~1e-2)."""
QUIET = torch.arange(INTERMEDIATE) % 8 < 3


def _gelu_bert() -> torch.nn.Module:
    """A tiny GELU BERT whose ``QUIET`` neurons sit at GELU(-3 + small) ~ -0.004 on every input: within
    0.01, never exactly 0, and a mean far from 0 (what the fold must account for)."""
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=INTERMEDIATE,
        vocab_size=100, max_position_embeddings=40,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight[QUIET] *= 0.01
            layer.intermediate.dense.bias[QUIET] = -3.0
    return model


def _silu_llama() -> torch.nn.Module:
    """A tiny LLaMA (gated SiLU, ``mlp_bias=True``) whose ``QUIET`` neurons have zero gate and up rows,
    gate bias -6 and up bias 0.05: SiLU(-6)·0.05 ~ -7.4e-4 on every row (within ``TAU``, not 0), so
    folding the mean is exact and dropping it is not."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=INTERMEDIATE, vocab_size=100, max_position_embeddings=64, use_cache=False, mlp_bias=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight[QUIET], mlp.gate_proj.bias[QUIET] = 0.0, -6.0
            mlp.up_proj.weight[QUIET], mlp.up_proj.bias[QUIET] = 0.0, 0.05
            mlp.down_proj.bias.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The LLaMA (saved), a LoRA (attention and the first down projection: merged before pruning), and
    the artifact compiled with ``--prune-dead-neurons`` (verified against the reference program; the
    test compares it with PEFT itself)."""
    root = tmp_path_factory.mktemp("deft-smooth")
    model = _silu_llama()
    model.save_pretrained(str(root / "model"))
    adapter = models.make_lora(model, root / "lora", target_modules=["q_proj", "v_proj", "layers.0.mlp.down_proj"])
    code = main(["compile", str(root / "model"), "--adapter", str(adapter), "-o", str(root / "out"),
                 "--prune-dead-neurons", "--max-error", str(BUDGET), "--dead-threshold", str(TAU),
                 "--calibration-samples", "4", "--no-oracle"])  # fmt: skip
    assert code == 0
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    return {"model": model, "root": root, "adapter": adapter, "out": root / "out", "manifest": manifest}


def test_gated_silu_artifact_matches_dense_peft(llama):
    density = llama["manifest"]["target"]["density"]
    assert density["max_error"] == BUDGET and density["error"] <= 1e-5 and density["dead_threshold"] == TAU
    assert [r["kept"] for r in density["layers"]] == [True, True]
    assert density["removed"] == 2 * DEAD and density["neurons"] == 2 * INTERMEDIATE
    assert llama["manifest"]["verification"]["passed"]
    assert min(llama["manifest"]["verification"]["adapter_effect"].values()) > 0.02
    runner = peftc.load(llama["out"])
    for shape, seed in (((2, 12), 31), ((1, 7), 32)):  # inputs neither the search nor verification saw
        inputs = models.text_inputs(*shape, seed=seed)
        # the quiet neurons are constant, so the fold is exact: fp32's bound, not the budget
        assert_outputs_close(runner(**inputs), models.peft_outputs(llama["model"], llama["adapter"], inputs))


def test_inspect_shows_the_threshold(llama, capsys):
    assert main(["inspect", str(llama["out"])]) == 0
    out = capsys.readouterr().out
    assert f"{2 * DEAD} of {2 * INTERMEDIATE} MLP neurons removed" in out and "dead threshold |h| <= 0.001" in out


def test_onnx_mlp_weights_lose_the_removed_rows_and_columns(llama):
    shapes = [tuple(i.dims) for i in onnx.load(str(llama["out"] / "model.onnx")).graph.initializer]
    kept = INTERMEDIATE - DEAD
    assert not [s for s in shapes if INTERMEDIATE in s]  # no MLP tensor of the dense width is left
    assert len([s for s in shapes if kept in s and len(s) == 2]) == 6  # gate, up and down weights per layer


QUIET_SET = set(QUIET.nonzero().flatten().tolist())


def _gelu_search(feeds, held) -> tuple[torch.nn.Module, list[bool]]:
    """The eager search the compile runs (``measure``, ``exploit``) on the GELU BERT at threshold 0.01."""
    model = _gelu_bert()
    blocks = find_blocks(model)
    counts = measure(model, blocks, feeds, 0.01)
    for count in counts:  # the quiet neurons: within the threshold, with a mean far from 0
        assert all(count.peak[QUIET] <= 0.01) and all(count.mean()[QUIET] < -1e-3)
    records = exploit.run_passes(exploit.Search(model, blocks, held, BUDGET), counts, ["prune-dead-neurons"])
    return model, [r["kept"] for r in records]


def test_gelu_removal_within_budget_without_the_fold_or_with_a_live_neuron_over_it(monkeypatch):
    feeds = [models.text_inputs(4, 12, seed=s) for s in range(4)]
    held = [models.text_inputs(4, 12, seed=s) for s in (40, 41)]
    pruned, kept = _gelu_search(feeds, held)
    assert kept == [True, True]
    assert pruned.encoder.layer[1].intermediate.dense.out_features == INTERMEDIATE - DEAD
    fresh = [models.text_inputs(2, 9, seed=50)]
    assert_outputs_close(run_model(pruned, fresh)[0], run_model(_gelu_bert(), fresh)[0], rel=BUDGET)
    real = exploit.dead_neurons

    def with_the_busiest(count):  # mutation: also remove the neuron with the largest |h|
        assert set(real(count).tolist()) == QUIET_SET
        return torch.cat([real(count), count.peak.argmax().reshape(1)])

    with monkeypatch.context() as patch:
        patch.setattr(exploit, "dead_neurons", with_the_busiest)
        assert _gelu_search(feeds, held)[1] == [False, False]
    monkeypatch.setattr(modules, "folded_bias", lambda weight, bias, removed, means: bias)  # mutation: no fold
    assert _gelu_search(feeds, held)[1] == [False, False]


def test_bad_threshold_is_one_line_exit_2(llama, capsys, tmp_path):
    for flags, named in (
        (["--prune-dead-neurons", "--dead-threshold", "-1"], "--dead-threshold -1.0"),
        (["--prune-dead-neurons", "--dead-threshold", "nan"], "--dead-threshold nan"),
        (["--skip-blocks", "--dead-threshold", "0.1"], "applies to --prune-dead-neurons only"),
    ):
        code = main(["compile", str(llama["root"] / "model"), "--adapter", str(llama["adapter"]), "-o",
                     str(tmp_path / "o"), *flags])  # fmt: skip
        assert code == 2 and named in error_line(capsys.readouterr().err)
