"""Adapter hot-swap on MiniLM: switch cost, swappable-artifact latency, mixed-adapter batches.

Run from the repository root (never alongside another benchmark)::

    python benchmarks/hotswap.py [--reps N] [--json]

Four synthetic LoRA adapters for all-MiniLM-L6-v2, made with PEFT and seeded: ranks 4, 8, 16 and 16
(α = 2r, one with rsLoRA) on all 36 attention and MLP linears, B ~ 0.02·N(0, 1). Compiled three times: ``swappable``
(``--swappable --max-rank 16``: all four as slot files), ``bank`` (the same with ``--multi-adapter 4``)
and ``merged`` (the first adapter merged, the reference for speed). Measured:

(a) **Switching.** ``peftc``: the first call with an adapter a runner has not used yet minus the
    call just before it with the adapter it already had (what a switch adds: loading the slot
    file), median over 6 switches on fresh runners, and the same for an adapter already used; ``recompile``: ``peftc.compile`` of the merged artifact for another adapter, end to end;
    ``PEFT``: ``PeftModel.set_adapter`` with the four adapters loaded. Goal: switch ≤ 50 ms.
(b) **Latency** at batch 1 and 8 × seq 128, interleaved (``benchmarks/compile_minilm.py``'s paired
    method): eager base, PEFT eager unmerged, peftc merged, peftc swappable (slots filled by the
    same adapter). Goal: swappable ≤ 1.15× merged.
(c) **Mixed batches** on the bank artifact: 8 rows over 4 adapters in one call vs one adapter for all
    8 rows vs 8 single-row calls. Goal: mixed ≤ 1.3× the single-adapter batch of 8.

Every path's outputs are checked against PEFT's eager model of the adapter it runs (max abs error).
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
from compile_minilm import (
    INPUT_SEED,
    MINILM_LINEARS,
    MODEL_SPEC,
    ORDER_SEED,
    SEQ,
    VOCAB_LOW,
    as_numpy,
    goal_met,
    log,
    paired_ratio,
    time_interleaved,
)

import peftc

ADAPTERS = {"a4": (4, False), "b8": (8, False), "c16": (16, False), "d16rs": (16, True)}
SWITCH_GOAL_MS = 50.0
SWAPPABLE_GOAL = 1.15
MIXED_GOAL = 1.3


def make_adapters(root: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model

    from examples.minilm import model as load_base

    paths = {}
    for index, (name, (rank, rslora)) in enumerate(ADAPTERS.items()):
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, use_rslora=rslora, target_modules=MINILM_LINEARS, init_lora_weights=False
        )
        torch.manual_seed(index)
        model = get_peft_model(load_base(), config)
        with torch.no_grad():  # trained-looking updates: B small but non-zero (PEFT's init is zero)
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.copy_(torch.randn_like(param) * 0.02)
        model.save_pretrained(str(root / name))
        paths[name] = str(root / name)
    return paths


def inputs(batch: int, vocab: int) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(INPUT_SEED + batch)
    ids = torch.randint(VOCAB_LOW, vocab, (batch, SEQ), generator=generator)
    return {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, SEQ), dtype=np.int64)}


def max_err(got: Any, expected: Any) -> float:
    a, b = as_numpy(got), as_numpy(expected)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in b if k in a)


def run(reps: int) -> dict[str, Any]:
    from peft import PeftModel

    from examples.minilm import model as load_base

    torch.set_num_threads(2)
    rng = random.Random(ORDER_SEED)
    result: dict[str, Any] = {"model": MODEL_SPEC, "adapters": ADAPTERS}
    with tempfile.TemporaryDirectory(prefix="peftc-hotswap-") as tmp:
        root = Path(tmp)
        log("== making 4 synthetic LoRA adapters")
        paths = make_adapters(root)
        names = list(paths)
        compile_s = {}
        for label, options in (
            ("swappable", {"swappable": True, "max_rank": 16}),
            ("bank", {"swappable": True, "max_rank": 16, "multi_adapter": 4}),
            ("merged", {}),
        ):
            log(f"== compile {label}")
            start = time.perf_counter()
            adapters = list(paths.values()) if options else paths[names[0]]
            peftc.compile(MODEL_SPEC, adapters, out=root / label, **options)
            compile_s[label] = time.perf_counter() - start
        result["compile_s"] = compile_s

        base = load_base().eval()
        vocab = int(base.config.vocab_size)
        peft_models = {}
        for name, path in paths.items():
            peft_models[name] = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()

        # (a) switching
        log("== (a) switching")
        small = inputs(1, vocab)
        overheads, warm = [], []
        for trial in range(2):
            runner = peftc.load(root / "swappable")
            runner(**small, adapter=names[0])  # session warm, first adapter loaded
            for name in names[1:]:
                start = time.perf_counter()
                runner(**small, adapter=names[0])
                steady = time.perf_counter() - start
                start = time.perf_counter()
                runner(**small, adapter=name)  # first use: the adapter file is loaded
                overheads.append(time.perf_counter() - start - steady)
                if trial:
                    start = time.perf_counter()
                    runner(**small, adapter=name)
                    warm.append(time.perf_counter() - start - steady)
        cold_switch = statistics.median(overheads)
        warm_switch = statistics.median(warm)
        median_call = steady
        multi = PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0]).eval()
        for name in names[1:]:
            multi.load_adapter(paths[name], adapter_name=name)
        peft_switch = []
        for name in [*names[1:], *names] * 3:
            start = time.perf_counter()
            multi.set_adapter(name)
            peft_switch.append(time.perf_counter() - start)
        log("   recompiling the merged artifact for another adapter")
        start = time.perf_counter()
        peftc.compile(MODEL_SPEC, paths[names[1]], out=root / "recompiled")
        recompile = time.perf_counter() - start
        result["switch_ms"] = {
            "peftc_cold": cold_switch * 1e3,
            "peftc_warm": warm_switch * 1e3,
            "peftc_median_call_b1": median_call * 1e3,
            "peft_set_adapter": statistics.median(peft_switch) * 1e3,
            "recompile": recompile * 1e3,
            "goal_ms": SWITCH_GOAL_MS,
            "met": cold_switch * 1e3 <= SWITCH_GOAL_MS,
        }

        # (b) latency, interleaved
        swappable = peftc.load(root / "swappable")
        merged = peftc.load(root / "merged")
        result["batches"] = []
        for batch, n in ((1, reps), (8, max(reps // 3, 3))):
            feed = inputs(batch, vocab)
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
            with torch.no_grad():
                expected = peft_models[names[0]](**tensors)
            calls = {
                "eager_base": lambda t=tensors: base(**t),
                "peft_eager_unmerged": lambda t=tensors: peft_models[names[0]](**t),
                "peftc_merged": lambda f=feed: merged(**f),
                "peftc_swappable": lambda f=feed: swappable(**f, adapter=names[0]),
            }
            log(f"== (b) batch {batch}: {n} interleaved repetitions")
            with torch.no_grad():
                errors = {k: max_err(c(), expected) for k, c in calls.items() if k != "eager_base"}
                times = time_interleaved(calls, n, rng)
            ratio = paired_ratio(times, "peftc_swappable", "peftc_merged")
            result["batches"].append(
                {
                    "batch": batch,
                    "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                    "swappable_vs_merged": ratio,
                    "peft_unmerged_vs_swappable": paired_ratio(times, "peft_eager_unmerged", "peftc_swappable"),
                    "max_abs_err_vs_peft": errors,
                    "met": goal_met(ratio["median"], SWAPPABLE_GOAL, "<="),
                }
            )

        # (c) mixed batches
        log("== (c) mixed batches")
        bank = peftc.load(root / "bank")
        feed = inputs(8, vocab)
        rows = [names[i % 4] for i in range(8)]
        singles = [{k: v[i : i + 1] for k, v in feed.items()} for i in range(8)]
        mixed_out = bank(**feed, adapter=rows)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.no_grad():
            per_adapter = {n: as_numpy(peft_models[n](**tensors)) for n in names}
        mixed_err = max(
            float(np.abs(mixed_out[o][i] - per_adapter[n][o][i]).max()) for i, n in enumerate(rows) for o in mixed_out
        )
        calls = {
            "mixed_b8": lambda: bank(**feed, adapter=rows),
            "single_adapter_b8": lambda: bank(**feed, adapter=names[0]),
            "eight_b1_calls": lambda: [bank(**s, adapter=n) for s, n in zip(singles, rows, strict=True)],
        }
        times = time_interleaved(calls, max(reps // 3, 3), rng)
        ratio = paired_ratio(times, "mixed_b8", "single_adapter_b8")
        result["mixed"] = {
            "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "mixed_vs_single_b8": ratio,
            "mixed_vs_eight_calls": paired_ratio(times, "mixed_b8", "eight_b1_calls"),
            "max_abs_err_vs_peft": mixed_err,
            "met": goal_met(ratio["median"], MIXED_GOAL, "<="),
        }
    return result


def report(r: dict[str, Any]) -> None:
    s = r["switch_ms"]
    print(f"hotswap benchmark: {r['model']} + 4 LoRA adapters (ranks 4, 8, 16, 16 rsLoRA; all 36 linears)")
    print("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
    print()
    print("(a) switching (ms)")
    print(f"  peftc first call with a new adapter, minus the call before  {s['peftc_cold']:8.2f}")
    print(f"  peftc call with an adapter already used, minus the same     {s['peftc_warm']:8.2f}")
    print(f"  peftc call, batch 1                                          {s['peftc_median_call_b1']:8.2f}")
    print(f"  PEFT set_adapter                                            {s['peft_set_adapter']:8.2f}")
    print(f"  recompiling a merged artifact                               {s['recompile']:8.0f}")
    print(f"  goal: switch <= {s['goal_ms']:g} ms -> {'goal met' if s['met'] else 'goal missed'}")
    print()
    print("(b) latency (median ms; paired median ratios [IQR])")
    for b in r["batches"]:
        med = b["median_ms"]
        ratio, peft = b["swappable_vs_merged"], b["peft_unmerged_vs_swappable"]
        print(f"  batch {b['batch']}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
        print(
            f"    swappable / merged {ratio['median']:.2f}x [{ratio['q1']:.2f}-{ratio['q3']:.2f}]  goal <= "
            f"{SWAPPABLE_GOAL}x -> {'goal met' if b['met'] else 'goal missed'};  PEFT unmerged / swappable "
            f"{peft['median']:.2f}x"
        )
        print("    max abs error vs PEFT: " + ", ".join(f"{k} {v:.1e}" for k, v in b["max_abs_err_vs_peft"].items()))
    m = r["mixed"]
    ratio, calls = m["mixed_vs_single_b8"], m["mixed_vs_eight_calls"]
    print()
    print(
        "(c) mixed batch of 8 rows over 4 adapters (median ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in m["median_ms"].items())
    )
    print(
        f"  mixed / single-adapter batch {ratio['median']:.2f}x [{ratio['q1']:.2f}-{ratio['q3']:.2f}]  goal <= "
        f"{MIXED_GOAL}x -> {'goal met' if m['met'] else 'goal missed'};  mixed / 8 single calls {calls['median']:.2f}x"
    )
    print(f"  max abs error of the mixed rows vs PEFT per row: {m['max_abs_err_vs_peft']:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions at batch 1 (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    result = run(args.reps)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
