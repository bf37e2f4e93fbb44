"""DEFT activation density exploited in eager PyTorch: latency and error against density on a ~110M
ReLU BERT (BERT-base shape from config: hidden 768, 12 layers, FFN 3072, ``hidden_act="relu"``).

Run from the repository root (alone: other processes' load slows it)::

    python benchmarks/deft.py [--quick] [--dead 0,0.5,0.75,0.9] [--seq 128] [--reps 5] [--threads 1] [--json]

Dead neurons come from a **seeded structured mask**, not from training (DEFT training a 110M model is
out of reach on a CPU): in every layer a fraction ``f`` of the FFN neurons, drawn with the seed, get
zero up-projection rows and bias −1, so ReLU outputs exactly 0 for them on every input (the
surviving neurons keep their random weights, about half active per row). For each ``f``:

* ``dense``: the masked model as it is;
* ``removal``: ``peftc analyze --prune-dead-neurons``'s pass (``peftc.density.analyze``): density
  measured on a calibration file of 64 × ``--seq`` seeded random tokens (the timed inputs'
  distribution; batches of 8, the second held out), dead neurons sliced out, kept per layer only if
  the error on the held-out batch is within ``--max-error`` 1e-5 (the removed fraction is reported);
* ``gather``: every down projection replaced by the gather-GEMM (``GatherLinear``), whatever the
  ``sparse-mlp`` pass would decide (``sparse-mlp kept`` says how many layers it keeps).

Latency: median of ``--reps`` interleaved forward calls per path (``torch.no_grad()``, eval, seeded
token ids, all-ones mask), batch 1 and 8 × ``--seq``. Error: the largest output error relative to the
output's scale (``relative_error``) against ``dense`` on the timed inputs. ``gain``: 1 − t/t_dense;
``flops removed``: the fraction of the model's multiply-adds (linear layers and attention products at
this sequence length, embeddings excluded) the removal takes out; ``gain / flops``: 1.0 is "latency
gain proportional to the removed fraction".

``--ort``: each path also exported by ``torch.onnx`` (dynamo, dynamic batch; the gather-GEMM's active
set becomes ``NonZero`` + ``Gather``) and run by peftc's onnxruntime runner (``OrtRunner``, its session
settings, ``--threads`` intra-op threads): rows ``ort_*``.

``--quick``: 2 layers, 2 repetitions, batch 1 and 8 × seq 64, f ∈ {0, 0.75}. Numbers on the shared
development VM are noisy (other jobs' load): compare ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftc.density import modules
from peftc.density.analyze import Request, analyze
from peftc.density.blocks import find_blocks, replace
from peftc.verification.compare import relative_error


def relu_bert(layers: int) -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(num_hidden_layers=layers, hidden_act="relu")
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def masked(model: torch.nn.Module, fraction: float, seed: int = 0) -> torch.nn.Module:
    """A copy with ``fraction`` of every layer's FFN neurons dead (zero up rows, bias −1)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in find_blocks(model):
            up = model.get_submodule(block.ups[0])
            dead = torch.randperm(up.out_features, generator=generator)[: int(fraction * up.out_features)]
            up.weight[dead] = 0
            up.bias[dead] = -1
    return model


def gathered(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for block in find_blocks(model):
        replace(model, block.down, modules.GatherLinear(model.get_submodule(block.down)))
    return model


def macs(model: torch.nn.Module, seq: int) -> float:
    """Multiply-adds per token: the encoder's linear layers plus the attention products."""
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n]
    hidden = model.config.hidden_size
    return sum(m.in_features * m.out_features for m in layers) + 2 * seq * hidden * model.config.num_hidden_layers


Path_ = Callable[[dict], np.ndarray]
"""A timed path: the inputs → ``last_hidden_state``."""


def eager(model: torch.nn.Module) -> Path_:
    def run(feed: dict) -> np.ndarray:
        with torch.no_grad():
            return model(**feed).last_hidden_state.numpy()

    return run


def onnx(model: torch.nn.Module, file: Path, feed: dict, threads: int) -> Path_:
    """``model`` exported by ``torch.onnx`` (dynamo, dynamic batch) and run by peftc's onnxruntime runner."""
    from peftc.backends.ort import OrtRunner

    batch = torch.export.Dim("batch")
    with torch.no_grad():
        torch.onnx.export(model, (), str(file), kwargs=feed, dynamo=True, verbose=False,
                          dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})  # fmt: skip
    runner = OrtRunner(file, threads=threads)
    return lambda feed: next(iter(runner.run({k: v.numpy() for k, v in feed.items()}).values()))


def timed(paths: dict[str, Path_], feed: dict, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per path (interleaved repetitions) and each path's error against the first."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {name: run(feed) for name, run in paths.items()}  # also the warm-up
    for _ in range(reps):
        for name, run in paths.items():
            start = time.perf_counter()
            run(feed)
            times[name].append(time.perf_counter() - start)
    want = {"y": next(iter(outputs.values()))}
    errors = {name: relative_error(want, {"y": out}) for name, out in outputs.items()}
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}, errors


def calibration(path: Path, seq: int) -> Path:
    """8 batches of 8 × ``seq`` seeded random tokens (the timed inputs' distribution), as a file."""
    generator = torch.Generator().manual_seed(100)
    ids = torch.randint(0, 30522, (64, seq), generator=generator)
    np.savez(path, input_ids=ids.numpy(), attention_mask=np.ones((64, seq), np.int64))
    return path


def row(base: torch.nn.Module, fraction: float, calib: Path, args: argparse.Namespace) -> dict:
    dense = masked(base, fraction)
    request = Request(dense, calibration=calib, passes=("prune-dead-neurons",), max_error=1e-5)
    report, removal = analyze(request)
    sparse_report, _ = analyze(dataclasses.replace(request, passes=("sparse-mlp",)))
    paths = {"dense": eager(dense), "removal": eager(removal), "gather": eager(gathered(dense))}
    if args.ort:
        example = {"input_ids": torch.zeros(2, args.seq, dtype=torch.int64),
                   "attention_mask": torch.ones(2, args.seq, dtype=torch.int64)}  # fmt: skip
        for name, model in (("dense", dense), ("removal", removal), ("gather", gathered(dense))):
            paths[f"ort_{name}"] = onnx(model, calib.parent / f"{name}-{fraction}.onnx", example, args.threads)
    removed = sum(r["removed"] for r in report["exploit"]["blocks"] if r["kept"])
    out = {
        "dead": fraction,
        "density": report["density"],
        "removed_neurons": removed / report["neurons"],
        "flops_removed": 1 - macs(removal, args.seq) / macs(dense, args.seq),
        "sparse_mlp_kept": sum(r["kept"] for r in sparse_report["exploit"]["blocks"]),
        "batches": {},
    }
    for batch in (1, 8):
        generator = torch.Generator().manual_seed(batch)
        feed = {"input_ids": torch.randint(0, 30522, (batch, args.seq), generator=generator),
                "attention_mask": torch.ones(batch, args.seq, dtype=torch.int64)}  # fmt: skip
        ms, errors = timed(paths, feed, args.reps)
        out["batches"][batch] = {"ms": ms, "error": errors}
    return out


def render(rows: list[dict]) -> str:
    lines = [
        "dead  density  removed  flops-  b  dense ms  removal ms  gain   gain/flops  gather ms  err removal  err gather"
    ]
    for r in rows:
        for batch, b in r["batches"].items():
            gain = 1 - b["ms"]["removal"] / b["ms"]["dense"]
            ratio = gain / r["flops_removed"] if r["flops_removed"] else float("nan")
            lines.append(
                f"{r['dead']:<5} {r['density']:<8.3f} {r['removed_neurons']:<8.3f} {r['flops_removed']:<7.3f} "
                f"{batch:<2} {b['ms']['dense']:<9.1f} {b['ms']['removal']:<11.1f} {gain:<6.3f} {ratio:<11.2f} "
                f"{b['ms']['gather']:<10.1f} {b['error']['removal']:<12.2g} {b['error']['gather']:.2g}"
            )
    for r in rows:
        for batch, b in r["batches"].items():
            if "ort_dense" in b["ms"]:
                ms, err = b["ms"], b["error"]
                lines.append(
                    f"ort f={r['dead']} b{batch}: dense {ms['ort_dense']:.1f} ms, removal {ms['ort_removal']:.1f} ms "
                    f"(gain {1 - ms['ort_removal'] / ms['ort_dense']:.3f}), gather {ms['ort_gather']:.1f} ms; errors "
                    f"{err['ort_dense']:.2g} / {err['ort_removal']:.2g} / {err['ort_gather']:.2g}"
                )
    kept = ", ".join(f"f={r['dead']}: {r['sparse_mlp_kept']}" for r in rows)
    lines.append(f"sparse-mlp pass kept the gather-GEMM in (layers): {kept}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dead", default="0,0.5,0.75,0.9")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ort", action="store_true", help="also export each path to ONNX and time it in onnxruntime")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.seq, args.reps, args.dead = 2, 64, 2, "0,0.75"
    torch.set_num_threads(args.threads)
    base = relu_bert(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration(Path(tmp) / "calibration.npz", args.seq)
        rows = []
        for fraction in args.dead.split(","):
            rows.append(row(base, float(fraction), calib, args))
            print(render(rows[-1:]), file=sys.stderr, flush=True)  # progress: each density as it is done
    print(json.dumps(rows, indent=1) if args.json else render(rows))


if __name__ == "__main__":
    main()
