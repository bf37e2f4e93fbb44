"""Adapter files in fp32, fp16 and int8 (``--slot-dtype``) on ``benchmarks/hotswap.py``'s MiniLM and adapters.

Run from the repository root (never alongside another benchmark)::

    python benchmarks/hotswap_slot_dtype.py [--reps N] [--json]

The four synthetic LoRA adapters of ``hotswap.py`` (ranks 4, 8, 16, 16; all 36 linears) compiled
three times with ``--swappable --max-rank 16 --slot-dtype D``. Measured per slot dtype:

* **bytes**: the four adapter files;
* **read**: reading one adapter file into what a call is given (onnxruntime's ``LoraAdapter`` for fp32,
  the decoded arrays for fp16/int8), median over the four files and ``--reps`` rounds, dtypes interleaved;
* **switch**: the first call with an adapter a runner has not used yet minus the call just before it
  (``hotswap.py``'s measure), median over 3 adapters × 3 fresh runners per dtype, interleaved;
* **latency** at batch 1 and 8 × seq 128, interleaved, paired median ratios to fp32;
* **error**: max abs and relative (to max|y|) error against PEFT's eager model of each adapter, and the
  budget the artifact verified it within.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from compile_minilm import MODEL_SPEC, ORDER_SEED, as_numpy, log, paired_ratio, time_interleaved
from hotswap import inputs, make_adapters

import peftc
from peftc.swap import storage

DTYPES = ("fp32", "fp16", "int8")


def _read_times(artifacts: dict[str, Path], names: list[str], reps: int, rng: random.Random) -> dict[str, float]:
    """Median seconds to read one adapter file into call-ready slot values, per dtype (interleaved)."""
    runners = {d: peftc.load(a).backend_runner for d, a in artifacts.items()}
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    for _ in range(reps):
        for dtype in rng.sample(DTYPES, len(DTYPES)):
            inner = runners[dtype].inner
            # what the runner does on a file's first use (peftc/swap/runtime.py)
            read = (
                inner.load_slots if dtype == "fp32" else lambda p, i=inner: storage.decode(i.slot_values(p), "float32")
            )
            for name in names:
                path = artifacts[dtype] / "adapters" / f"{name}.onnx_adapter"
                start = time.perf_counter()
                read(path)
                times[dtype].append(time.perf_counter() - start)
    return {d: statistics.median(t) for d, t in times.items()}


def _switch_times(artifacts: dict[str, Path], names: list[str], rng: random.Random, vocab: int) -> dict[str, float]:
    """Median extra seconds of a call's first use of an adapter, per dtype (fresh runners, interleaved)."""
    small = inputs(1, vocab)
    extra: dict[str, list[float]] = {d: [] for d in DTYPES}
    for _ in range(3):
        for dtype in rng.sample(DTYPES, len(DTYPES)):
            runner = peftc.load(artifacts[dtype])
            runner(**small, adapter=names[0])
            for name in names[1:]:
                start = time.perf_counter()
                runner(**small, adapter=names[0])
                steady = time.perf_counter() - start
                start = time.perf_counter()
                runner(**small, adapter=name)
                extra[dtype].append(time.perf_counter() - start - steady)
    return {d: statistics.median(t) for d, t in extra.items()}


def run(reps: int) -> dict[str, Any]:
    from peft import PeftModel

    from examples.minilm import model as load_base

    torch.set_num_threads(2)
    rng = random.Random(ORDER_SEED)
    result: dict[str, Any] = {"model": MODEL_SPEC}
    with tempfile.TemporaryDirectory(prefix="peftc-slot-dtype-") as tmp:
        root = Path(tmp)
        log("== making 4 synthetic LoRA adapters")
        paths = make_adapters(root)
        names = list(paths)
        artifacts = {}
        for dtype in DTYPES:
            log(f"== compile --slot-dtype {dtype}")
            artifacts[dtype] = root / dtype
            peftc.compile(MODEL_SPEC, list(paths.values()), out=artifacts[dtype], swappable=True, max_rank=16,
                          slot_dtype=dtype)  # fmt: skip
        result["bytes"] = {d: sum(p.stat().st_size for p in (a / "adapters").iterdir()) for d, a in artifacts.items()}
        result["budget"] = {d: peftc.load(a).manifest.target["slots"]["slot_budget"] for d, a in artifacts.items()}
        base = load_base().eval()
        vocab = int(base.config.vocab_size)
        log("== read and switch times")
        result["read_ms"] = {d: t * 1e3 for d, t in _read_times(artifacts, names, reps, rng).items()}
        result["switch_ms"] = {d: t * 1e3 for d, t in _switch_times(artifacts, names, rng, vocab).items()}

        runners = {d: peftc.load(a) for d, a in artifacts.items()}
        errors: dict[str, dict[str, float]] = {d: {} for d in DTYPES}
        feed = inputs(8, vocab)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        for name, path in paths.items():
            with torch.no_grad():
                expected = as_numpy(PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(**tensors))
            for dtype, runner in runners.items():
                got = runner(**feed, adapter=name)
                for key in expected:
                    diff = float(np.abs(got[key].astype(np.float64) - expected[key]).max())
                    rel = diff / float(np.abs(expected[key]).max())
                    errors[dtype]["abs"] = max(errors[dtype].get("abs", 0.0), diff)
                    errors[dtype]["rel"] = max(errors[dtype].get("rel", 0.0), rel)
        result["error_vs_peft"] = errors
        result["batches"] = []
        for batch, n in ((1, reps), (8, max(reps // 3, 3))):
            feed = inputs(batch, vocab)
            calls = {d: (lambda r=r, f=feed: r(**f, adapter=names[2])) for d, r in runners.items()}
            log(f"== latency, batch {batch}: {n} interleaved repetitions")
            times = time_interleaved(calls, n, rng)
            result["batches"].append(
                {
                    "batch": batch,
                    "median_ms": {d: statistics.median(t) * 1e3 for d, t in times.items()},
                    "vs_fp32": {d: paired_ratio(times, d, "fp32") for d in DTYPES[1:]},
                }
            )
    return result


def report(r: dict[str, Any]) -> None:
    print(f"slot dtypes: {r['model']} + 4 LoRA adapters (ranks 4, 8, 16, 16; --max-rank 16; all 36 linears)")
    print(f"{'':28}" + "".join(f"{d:>12}" for d in DTYPES))
    rows = [
        ("adapter files, 4 (KiB)", {d: b / 1024 for d, b in r["bytes"].items()}, "{:12.0f}"),
        ("read one file (ms)", r["read_ms"], "{:12.2f}"),
        ("switch: first call extra (ms)", r["switch_ms"], "{:12.2f}"),
    ]
    rows += [(f"batch {b['batch']} call (median ms)", b["median_ms"], "{:12.2f}") for b in r["batches"]]
    rows += [
        ("max rel error vs PEFT", {d: e["rel"] for d, e in r["error_vs_peft"].items()}, "{:12.1e}"),
        ("verified budget (rel)", r["budget"], "{:12.1e}"),
    ]
    for label, values, fmt in rows:
        print(f"{label:28}" + "".join(fmt.format(values[d]) for d in DTYPES))
    for b in r["batches"]:
        ratios = ", ".join(f"{d} {v['median']:.3f}x [{v['q1']:.3f}-{v['q3']:.3f}]" for d, v in b["vs_fp32"].items())
        print(f"batch {b['batch']} paired ratio to fp32: {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions at batch 1 (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    result = run(args.reps)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
