"""DEFT dead-neuron removal in compiled artifacts: latency of the ONNX artifact ``peftc compile
--prune-dead-neurons [--skip-blocks]`` writes against the dense artifact, at batch 1 and 8, and the
measured gain against the one the removed multiply-adds predict.

Run from the repository root (alone: other processes' load slows it)::

    python benchmarks/deft_compiled.py [--quick] [--layers 12] [--dead 0.5,0.75,0.9] [--skip 2] [--seq 128]
                                       [--reps 10] [--json]

The model is ``benchmarks/deft.py``'s: a ReLU BERT of BERT-base shape from config (hidden 768, FFN
3072, ``hidden_act="relu"``, random weights, ``--layers`` layers), with dead neurons from a **seeded
structured mask** (``deft.masked``: in every layer a fraction ``f`` of the FFN neurons, drawn with
seed 0, get a zero up-projection row and bias −1, so ReLU outputs exactly 0 for them on every input),
which is what DEFT training drives neurons towards (training a 110M model is out of reach on a CPU).
One seeded LoRA (r=8 on query/value, B drawn at 0.02 so it changes the output) is the adapter of
every compile. Artifacts (``peftc.compile``, onnx, fp32, merged, verified against the reference
program and PEFT):

* ``dense``: the unmasked model (the masked ones have the same shapes, so the same dense cost);
* ``prune f``: the model masked at ``f``, ``--prune-dead-neurons``, calibrated on ``deft.calibration``
  (64 × ``--seq`` seeded random tokens, batches of 8; every fourth batch from the second held out; the
  passes add one seeded batch of each ``analyze.coverage`` shape to both sets: the verifier's three and
  2 × 1, 4 and 128 tokens), at the default budget 1e-5;
* ``prune+skip f``  (``--skip K`` > 0, at the largest ``f``): the same with the last ``K`` layers' down
  projections scaled by 1e-8 (blocks that contribute nothing, as the ones ADA-DEFT skips) and
  ``--prune-dead-neurons --skip-blocks``.

Latency: each artifact loaded by ``peftc.load`` (onnxruntime, peftc's session settings), the same seeded
token ids (all-ones mask) at batch 1 and 8 × ``--seq``; ``--reps`` repetitions interleaved over the
artifacts, median. ``gain`` = 1 − t/t_dense. ``expected`` = the MLP's share of the model's
multiply-adds per token (linear layers and attention products at this sequence length, embeddings
excluded: ``deft.macs``) × the fraction of MLP neurons removed (from the manifest's
``target.density``): what "a latency gain proportional to the removed fraction" predicts. ``error``:
the manifest's density error on the held-out inputs and the largest relative error of its
verification cases (an artifact that fails verification, because a neuron dead on the calibration
inputs fires on the verification ones, is kept with ``keep_failed``, timed and marked).

``--quick``: 2 layers, seq 64, f ∈ {0.75}, ``--skip 1``, 5 reps. The shared development VM is noisy
(other jobs' load): only ratios measured side by side in one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import deft  # benchmarks/deft.py: the model, the mask, the calibration file, the MAC count
import sparsity  # benchmarks/sparsity.py: the seeded LoRA


def lora(model: torch.nn.Module, path: Path) -> Path:
    """A seeded PEFT LoRA (r=8 on query/value, B ~ 0.02·N(0, 1)) saved at ``path``."""
    return sparsity.seeded_lora(model, path, 8, ["query", "value"])


def weakened(model: torch.nn.Module, last: int) -> torch.nn.Module:
    """``model`` with the last ``last`` layers' MLP down projections scaled by 1e-8 (skippable blocks)."""
    with torch.no_grad():
        for layer in model.encoder.layer[len(model.encoder.layer) - last :]:
            layer.output.dense.weight.mul_(1e-8)
    return model


def build(root: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Compile every artifact; per name its directory, compile seconds and density record."""
    import peftc

    base = deft.relu_bert(args.layers)
    adapter = lora(base, root / "lora")
    calib = deft.calibration(root / "calibration.npz", args.seq)
    fractions = [float(f) for f in args.dead.split(",")]
    builds = {"dense": (base, ())}
    for f in fractions:
        builds[f"prune {f}"] = (deft.masked(base, f), ("prune-dead-neurons",))
    if args.skip:
        builds[f"prune+skip {fractions[-1]}"] = (
            weakened(deft.masked(base, fractions[-1]), args.skip),
            ("prune-dead-neurons", "skip-blocks"),
        )
    built = {}
    for name, (model, density) in builds.items():
        print(f"compiling {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        extra = {"density": density, "calibration": calib} if density else {}
        peftc.compile(model, [adapter], out=root / f"out-{len(built)}", keep_failed=True, **extra)
        manifest = json.loads((root / f"out-{len(built)}" / "manifest.json").read_text())
        cases = manifest["verification"]["cases"]
        built[name] = {
            "dir": root / f"out-{len(built)}",
            "compile_s": round(time.perf_counter() - start, 1),
            "density": manifest["target"].get("density"),
            "verified_error": max(o["max_rel"] for c in cases for o in c["outputs"]),
            "verified": manifest["verification"]["passed"],
        }
    built["dense"]["macs"] = deft.macs(base, args.seq)
    built["dense"]["mlp_macs"] = 2 * base.config.hidden_size * base.config.intermediate_size * args.layers
    return built


def timed(built: dict[str, dict], args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Median ms per artifact at batch 1 and 8 (repetitions interleaved over the artifacts)."""
    from peftc.runtime import load

    runners = {name: load(b["dir"], allow_failed=True) for name, b in built.items()}
    out = {}
    for batch in (1, 8):
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, 30522, (batch, args.seq), generator=generator).numpy()
        feed = {"input_ids": ids, "attention_mask": ids * 0 + 1}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for run in runners.values():
            run(**feed)  # warm-up
        for _ in range(args.reps):
            for name, run in runners.items():
                start = time.perf_counter()
                run(**feed)
                times[name].append(time.perf_counter() - start)
        out[batch] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return out


def rows(built: dict[str, dict], ms: dict[int, dict[str, float]]) -> list[dict]:
    """One row per sparsified artifact: removed fraction, expected and measured gains, errors."""
    dense = built["dense"]
    share = dense["mlp_macs"] / dense["macs"]
    result = []
    for name, b in built.items():
        if name == "dense":
            continue
        d = b["density"]
        removed = d["removed"] / d["neurons"]
        row = {"name": name, "removed": removed, "mlp_share": share, "expected": share * removed,
               "error": d["error"], "verified_error": b["verified_error"], "verified": b["verified"],
               "compile_s": b["compile_s"],
               "kept": sorted({(r["pass"]) for r in d["layers"] if r["kept"]})}  # fmt: skip
        for batch, times in ms.items():
            row[f"b{batch}_ms"], row[f"b{batch}_dense_ms"] = times[name], times["dense"]
            row[f"b{batch}_gain"] = 1 - times[name] / times["dense"]
        result.append(row)
    return result


def render(table: list[dict]) -> str:
    header = "artifact            removed  MLP share  expected  b1 ms (dense)    b1 gain  b8 ms (dense)     b8 gain  "
    lines = [header + "gain/expected b1/b8  error (held-out / verified)"]
    for r in table:
        ratio = [r[f"b{b}_gain"] / r["expected"] if r["expected"] else float("nan") for b in (1, 8)]
        lines.append(
            f"{r['name']:<19} {r['removed']:<8.3f} {r['mlp_share']:<10.3f} {r['expected']:<9.3f} "
            f"{r['b1_ms']:>6.1f} ({r['b1_dense_ms']:>6.1f})  {r['b1_gain']:<8.3f} "
            f"{r['b8_ms']:>6.1f} ({r['b8_dense_ms']:>6.1f})  {r['b8_gain']:<8.3f} "
            f"{ratio[0]:.2f} / {ratio[1]:.2f}          {r['error']:.2g} / {r['verified_error']:.2g}"
            + ("" if r["verified"] else " (verification FAILED: kept with keep_failed)")
        )
    lines.append("compile s: " + ", ".join(f"{r['name']} {r['compile_s']}" for r in table))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dead", default="0.5,0.75,0.9")
    parser.add_argument("--skip", type=int, default=2, help="skippable last layers at the largest f (0: none)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.seq, args.reps, args.dead, args.skip = 2, 64, 5, "0.75", 1
    with tempfile.TemporaryDirectory(prefix="peftc-deft-") as tmp:
        built = build(Path(tmp), args)
        ms = timed(built, args)
    table = rows(built, ms)
    print(json.dumps(table, indent=1) if args.json else render(table))


if __name__ == "__main__":
    main()
