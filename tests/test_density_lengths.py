"""Dead-neuron removal must hold at every sequence length the artifact is verified and run at: a tiny ReLU
BERT with a neuron that is silent on long sequences and fires on short ones, calibrated on a file of long
sequences only (the case of ``benchmarks/deft_compiled.py`` at 12 layers)."""

from __future__ import annotations

import json

import models
import numpy as np
import pytest
import torch
from cli_run import error_line

import peftc
from peftc.cli import main
from peftc.density import analyze

INTERMEDIATE, LONG, SHORT_ONLY = 48, 128, 3
"""48 neurons, 18 of them dead on every input; neuron 3 fires only on sequences shorter than ~60 tokens."""
DEAD = torch.arange(INTERMEDIATE) % 8 < 3
ACT = "encoder.layer.0.intermediate.intermediate_act_fn"


def length_detector() -> torch.nn.Module:
    """A 1-layer ReLU BERT whose MLP input feature 1 measures 1 / (number of unmasked tokens).

    Attention is uniform (query 0), and the value reads only feature 0, which only position 0's embedding
    has: every position gets position 0's feature divided by the sequence length, amplified into feature
    1 by the attention output (about 0.9 at most on 128 tokens, 2.5 to 4.3 at 16, 3.9 to 4.9 at 9).
    Neuron ``SHORT_ONLY`` reads feature 1 with bias -1.5: silent on 128-token rows, active on short ones.
    """
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=INTERMEDIATE,
        vocab_size=100, max_position_embeddings=LONG, hidden_act="relu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    emb, layer = model.embeddings, model.encoder.layer[0]
    attention, up = layer.attention, layer.intermediate.dense
    with torch.no_grad():
        for table in (emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight):
            table[:, :2] = 0.0
        emb.position_embeddings.weight[0, 0] = 1.0
        for linear in (attention.self.query, attention.self.value, attention.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        attention.self.value.weight[1, 0] = 1.0
        attention.output.dense.weight[1, 1] = 10.0
        up.weight[DEAD], up.bias[DEAD] = 0.0, -1.0
        up.weight[SHORT_ONLY], up.bias[SHORT_ONLY] = 0.0, -1.5
        up.weight[SHORT_ONLY, 1] = 1.0
    return model


@pytest.fixture(scope="module")
def lengths(tmp_path_factory):
    """The model (saved), a LoRA on its MLP's down projection, and a calibration file of 24 × 128 tokens."""
    root = tmp_path_factory.mktemp("deft-lengths")
    model = length_detector()
    model.save_pretrained(str(root / "model"))
    adapter = models.make_lora(model, root / "lora", target_modules=["encoder.layer.0.output.dense"])
    ids = torch.randint(0, 100, (24, LONG), generator=torch.Generator().manual_seed(100)).numpy()
    np.savez(root / "long.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    return {"root": root, "model": model, "adapter": adapter, "calibration": root / "long.npz"}


def _active(model: torch.nn.Module, feed: dict) -> torch.Tensor:
    """Whether neuron ``SHORT_ONLY`` is non-zero, per row of ``feed`` (an independent hook on ReLU's input)."""
    seen = []
    hook = model.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(**feed)
    hook.remove()
    return seen[0][..., SHORT_ONLY] > 0


def test_the_neuron_is_silent_on_long_rows_and_fires_on_short_ones(lengths):
    ids = torch.as_tensor(np.load(lengths["calibration"])["input_ids"])
    assert not _active(lengths["model"], {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).any()
    assert _active(lengths["model"], models.text_inputs(2, 16, seed=0)).all()


def test_calibrated_on_long_rows_the_short_only_neuron_is_kept_and_the_artifact_verifies(lengths):
    root = lengths["root"]
    code = main(["compile", str(root / "model"), "--adapter", str(lengths["adapter"]), "-o", str(root / "out"),
                 "--prune-dead-neurons", "--calibration", str(lengths["calibration"]), "--json"])  # fmt: skip
    assert code == 0
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    density = manifest["target"]["density"]
    assert manifest["verification"]["passed"]
    assert density["removed"] == int(DEAD.sum())  # the 18 dead on every input, not the short-only neuron
    shapes = density["calibration"]["coverage"]["shapes"]  # the verifier's, short ones and a long one
    assert shapes == [{"batch": b, "seq": s} for b, s in ((2, 16), (1, 9), (3, 33), (2, 1), (2, 4), (2, 128))]
    assert density["held_out_batches"] == 1 + len(shapes)  # the file's batch 1 of 3, and one per shape
    assert min(manifest["verification"]["adapter_effect"].values()) > 0.02
    runner = peftc.load(root / "out")
    for shape, seed in (((2, 3), 41), ((1, 12), 42), ((2, 100), 43)):  # lengths nothing above used
        inputs = models.text_inputs(*shape, seed=seed)
        want = models.peft_outputs(lengths["model"], lengths["adapter"], inputs)
        got = runner(**inputs)
        for name in ("last_hidden_state", "pooler_output"):
            scale = float(np.abs(want[name]).max())
            assert float(np.abs(got[name] - want[name]).max()) <= 1e-5 * scale


def test_without_short_rows_in_the_calibration_the_held_out_check_refuses_the_layer(lengths, capsys, monkeypatch):
    real = analyze.covering  # mutation: the calibration keeps only the file's 128-token rows

    def held_out_only(signature, shapes, seed):
        return [] if seed == analyze.COVERAGE_SEEDS[0] else real(signature, shapes, seed)

    monkeypatch.setattr(analyze, "covering", held_out_only)
    root = lengths["root"]
    code = main(["compile", str(root / "model"), "--adapter", str(lengths["adapter"]), "-o", str(root / "mutant"),
                 "--prune-dead-neurons", "--calibration", str(lengths["calibration"])])  # fmt: skip
    line = error_line(capsys.readouterr().err)
    assert code == 1 and "cannot meet the error budget 1e-05 on the held-out inputs" in line and ACT in line
    assert not (root / "mutant").exists()
