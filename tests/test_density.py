"""Activation density (DEFT): ``peftc analyze --density`` on a DEFT-trained ReLU BERT, and the
exploitation passes (dead-neuron removal, block skipping, sparse MLP) against dense eager."""

from __future__ import annotations

import json

import deft_train
import numpy as np
import pytest
import torch
from models import text_inputs

from peftc.cli import main
from peftc.density import exploit
from peftc.density.analyze import Request, analyze
from peftc.errors import InputError

ACTS = [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The DEFT-trained BERT (saved), the untrained one, a density-trained LoRA, and a calibration file."""
    root = tmp_path_factory.mktemp("deft")
    base = deft_train.relu_bert()
    model, losses = deft_train.deft_bert()
    assert losses[-1] < 0.1 * losses[0]  # the density loss really went down
    model.save_pretrained(str(root / "deft"))
    base.save_pretrained(str(root / "base"))
    deft_train.deft_lora(base, root / "lora")
    feeds = [text_inputs(4, 12, seed=s) for s in range(4)]
    arrays = {k: np.concatenate([f[k].numpy() for f in feeds]) for k in feeds[0]}
    np.savez(root / "calib.npz", **arrays)
    return {"root": root, "model": model, "base": base, "feeds": feeds}


def _run(capsys, *argv):
    code = main(["analyze", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _independent_density(model, feeds):
    """Non-zero fraction of relu(intermediate.dense(x)) per layer, from hooks on the up projection."""
    counts = {}
    hooks = [
        model.get_submodule(f"encoder.layer.{i}.intermediate.dense").register_forward_hook(
            lambda m, a, out, i=i: counts.setdefault(i, []).append(torch.relu(out))
        )
        for i in range(2)
    ]
    with torch.no_grad():
        for feed in feeds:
            model(**feed)
    for hook in hooks:
        hook.remove()
    return [float(sum((a > 0).sum() for a in acts) / sum(a.numel() for a in acts)) for acts in counts.values()]


def test_analyze_density_json_table_plot(trained, capsys, tmp_path):
    root = trained["root"]
    code, out, _ = _run(capsys, root / "deft", "--density", "--calibration", root / "calib.npz", "--json",
                        "--plot", tmp_path)  # fmt: skip
    assert code == 0
    report = json.loads(out)
    assert [layer["name"] for layer in report["layers"]] == ACTS
    expected = _independent_density(trained["model"], trained["feeds"])
    for layer, want in zip(report["layers"], expected, strict=True):
        assert layer["density"] == pytest.approx(want, abs=1e-9)
        assert layer["dead_neurons"] == sum(f == 0 for f in layer["frequency"])
        assert len(layer["frequency"]) == layer["neurons"] == 64
    assert report["density"] < 0.1  # DEFT training made it sparse
    for name in ACTS:
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # before training, and the density-trained LoRA on the untrained model: the table for people
    code, before, _ = _run(capsys, root / "base", "--density", "--calibration", root / "calib.npz")
    assert code == 0 and ACTS[0] in before
    untrained = _independent_density(trained["base"], trained["feeds"])
    assert f"density {np.mean(untrained):.4f}" in before and np.mean(untrained) > 0.4
    code, adapted, _ = _run(capsys, root / "base", "--adapter", root / "lora", "--density", "--calibration",
                            root / "calib.npz", "--json")  # fmt: skip
    assert json.loads(adapted)["density"] < 0.5 * np.mean(untrained)


def test_dead_neuron_removal_is_exact_on_relu(trained):
    request = Request(trained["model"], samples=16, held_out=2, passes=("prune-dead-neurons",), max_error=1e-6)
    report, pruned = analyze(request)
    assert pruned is not trained["model"]
    removed = {r["name"]: r["removed"] for r in report["exploit"]["blocks"] if r["kept"]}
    dead = {layer["name"]: layer["dead_neurons"] for layer in report["layers"]}
    assert removed and all(removed[name] == dead[name] for name in removed)
    for name, count in removed.items():
        layer = name.rsplit(".", 2)[0]
        assert pruned.get_submodule(f"{layer}.intermediate.dense").out_features == 64 - count
        assert pruned.get_submodule(f"{layer}.output.dense").in_features == 64 - count
    assert report["exploit"]["error"] <= 1e-6
    with torch.no_grad():  # calibration-like inputs the search never saw
        for seed in (11, 12):
            feed = text_inputs(3, 10, seed=seed)
            dense, sliced = trained["model"](**feed), pruned(**feed)
            assert torch.allclose(dense.last_hidden_state, sliced.last_hidden_state, rtol=0, atol=1e-6)


def test_block_skipping_within_budget_vs_dense_eager(trained):
    budget = 0.05
    report, skipped = analyze(
        Request(trained["base"], samples=2, held_out=2, passes=("skip-blocks",), max_error=budget)
    )
    kept = [r for r in report["exploit"]["blocks"] if r["kept"]]
    assert kept and all(r["error"] <= budget for r in kept)
    refused = [r for r in report["exploit"]["blocks"] if not r["kept"]]
    assert all(r["error"] > budget for r in refused)
    layer = kept[0]["name"].rsplit(".", 2)[0]
    down = skipped.get_submodule(f"{layer}.output.dense")
    assert type(down).__name__ == "BiasOnly"
    feed = text_inputs(2, 8, seed=21)
    with torch.no_grad():
        want, got = trained["base"](**feed).last_hidden_state, skipped(**feed).last_hidden_state
    assert 0 < float((want - got).abs().max() / want.abs().max()) <= 2 * budget  # unseen input: near the budget


def test_removing_a_live_neuron_fails_verification(trained, monkeypatch):
    real = exploit.dead_neurons

    def with_a_live_one(count):
        live = int(count.nonzero.argmax())  # the most active neuron
        return torch.cat([real(count), torch.tensor([live])])

    monkeypatch.setattr(exploit, "dead_neurons", with_a_live_one)
    report, _ = analyze(Request(trained["model"], samples=4, held_out=2, passes=("prune-dead-neurons",)))
    busiest = {layer["name"]: max(layer["frequency"]) for layer in report["layers"]}
    checked = [r for r in report["exploit"]["blocks"] if busiest[r["name"]] > 0.5]  # active in most rows
    assert checked
    for record in checked:
        assert not record["kept"] and record["block_error"] > 1e-3 and record["error"] > 1e-5


def test_sparse_mlp_says_whether_it_pays(trained):
    report, model = analyze(Request(trained["model"], samples=2, held_out=2, passes=("sparse-mlp",)))
    for record in report["exploit"]["blocks"]:
        assert record["dense_ms"] > 0 and record["sparse_ms"] > 0
        assert record["kept"] == (type(model.get_submodule(record["name"].replace(
            "intermediate.intermediate_act_fn", "output.dense"))).__name__ == "GatherLinear")  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [
        {"input_ids": np.zeros((4,), np.int64)},  # wrong rank
        {"input_ids": np.zeros((4, 8), np.float32)},  # wrong dtype
    ],
)
def test_bad_calibration_is_one_line_exit_2(trained, capsys, tmp_path, bad):
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    code, _, err = _run(capsys, trained["root"] / "deft", "--density", "--calibration", path)
    assert code == 2 and err.count("\n") == 1 and str(path) in err and "input_ids" in err


def test_bad_flags_are_one_line_exit_2(trained, capsys):
    code, _, err = _run(capsys, trained["root"] / "deft", "--density", "--prune-dead-neurons", "--max-error", "-1")
    assert code == 2 and err.count("\n") == 1 and "--max-error -1" in err
    code, _, err = _run(capsys, trained["root"] / "deft")
    assert code == 2 and err.count("\n") == 1 and "--density" in err
    with pytest.raises(InputError, match="--samples"):
        Request(trained["model"], samples=0)


def test_passes_on_a_calibration_file_hold_out_every_fourth_batch(trained, capsys):
    root = trained["root"]  # 16 rows: batch 0 (8 rows) calibrates, batch 1 is held out
    code, out, _ = _run(capsys, root / "deft", "--density", "--calibration", root / "calib.npz",
                        "--prune-dead-neurons", "--max-error", "1e-6")  # fmt: skip
    assert code == 0
    # batch 1, and one batch per coverage shape: 2 x 16, 1 x 9, 3 x 33, and 2 x 1, 4 and 64 (the longest)
    assert "on 7 held-out batches" in out and "prune-dead-neurons" in out
    for line in out.splitlines():
        if "prune-dead-neurons" in line and " kept " in line:
            assert float(line.split()[-1]) <= 1e-6
