"""Time and memory of ``peftc combine`` on all-MiniLM-L6-v2: 2, 8 and 32 LoRA adapters, every method,
against PEFT's ``add_weighted_adapter`` where it has the method.

Run from the repository root (alone: other processes' load slows it)::

    python benchmarks/combine.py [--counts 2,8,32] [--methods ties,cat] [--rank 8] [--json]

Adapters: seeded LoRA r=8 (α=16) on every linear layer of the encoder (query, key, value, the three
``dense``: 36 modules), every factor random, saved with PEFT's ``save_pretrained``.

What it measures, per (count, method), in this process with the model already loaded:

* ``peftc s``: ``time.perf_counter()`` around read + parse of the adapters, the combination and writing
  the output (``peftc.combine.run.task_vectors`` + ``write``);
* ``peak MB``: the peak resident set size above the one before the call, sampled every 2 ms from
  ``/proc/self/statm`` by a thread (the allocator keeps freed pages, so it is an upper bound);
* ``bound MB``: what streaming should hold: every adapter's ΔW of the largest tensor (fp32), plus the
  merged task vector for OPCM (which is not streamed: each step rescales the whole model);
* ``peft s``: ``add_weighted_adapter`` on a ``PeftModel`` with the adapters already loaded (loading not
  timed) for ``cat``, ``svd`` (``svd_rank`` = 8), ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune`` and ``linear`` (beside task-arithmetic) — PEFT combines the factors separately for
  all but cat/svd, so it is faster there but not ΔW-exact (peft#3004).

The goal: 8 adapters combined in ≤ 5 s with each method.

Threads: one by default. On the shared 2-vCPU machine under load, two OpenMP threads made one
1536×384 SVD ~30× slower than one thread (spinning threads competing with other processes); on an idle
machine ``--threads 2`` is the fair setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from examples.minilm import model as minilm
from peftc.combine.options import METHODS, CombineOptions
from peftc.combine.run import task_vectors, write

PEFT_NAMES = {
    "cat": "cat",
    "svd": "svd",
    "ties": "ties",
    "dare-linear": "dare_linear",
    "dare-ties": "dare_ties",
    "magnitude-prune": "magnitude_prune",
    "task-arithmetic": "linear",
}
GOAL_SECONDS = 5.0
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The peak RSS above the starting one while the block runs (sampled)."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def make_adapters(model, count: int, rank: int, root: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "key", "value", "dense"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    paths = []
    for index in range(count):
        torch.manual_seed(index)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.05)
        path = root / f"a{index}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def bound_mb(tv, method: str) -> float:
    largest = max(tv.modules.tensors[k].numel() for k in tv.keys)
    total = len(tv.adapters) * largest * 4
    if method == "opcm":
        total += 2 * sum(tv.modules.tensors[k].numel() for k in tv.keys) * 4
    return total / 2**20


def time_peftc(model, adapters, method: str, root: Path) -> tuple[float, float, float]:
    options = CombineOptions(method, rank=8, order=tuple(range(len(adapters))) if method == "opcm" else None)
    out = Path(tempfile.mkdtemp(dir=root))
    with PeakRss() as peak:
        start = time.perf_counter()
        tv = task_vectors(model, adapters)
        write(tv, options.checked_for(len(adapters)), out, str(out))
        seconds = time.perf_counter() - start
    return seconds, peak.mb, bound_mb(tv, method)


def time_peft(model, adapters, methods: list[str]) -> dict[str, float]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapters[0]), adapter_name="a0")
        for index, path in enumerate(adapters[1:], 1):
            peft_model.load_adapter(str(path), adapter_name=f"a{index}")
        names = [f"a{i}" for i in range(len(adapters))]
        out = {}
        for method in methods:
            kind = PEFT_NAMES.get(method)
            if kind is None:
                continue
            kwargs = {"density": 0.2} if kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}
            kwargs |= {"svd_rank": 8} if kind == "svd" else {}
            print(f"  peft {kind} on {len(names)} adapters", file=sys.stderr, flush=True)
            start = time.perf_counter()
            peft_model.add_weighted_adapter(names, [1.0] * len(names), f"mix_{kind}", combination_type=kind, **kwargs)
            out[method] = time.perf_counter() - start
            peft_model.delete_adapter(f"mix_{kind}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="2,8,32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    model = minilm()
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftc-combine-bench-") as tmp:
        root = Path(tmp)
        print(f"making {max(counts)} adapters", file=sys.stderr, flush=True)
        adapters = make_adapters(model, max(counts), args.rank, root)
        for count in counts:
            peft_times = time_peft(model, adapters[:count], methods)
            for method in methods:
                seconds, peak, bound = time_peftc(model, adapters[:count], method, root)
                rows.append({"count": count, "method": method, "peftc_s": seconds, "peak_mb": peak,
                             "bound_mb": bound, "peft_s": peft_times.get(method)})  # fmt: skip
                print(f"{count:>3} {method:<16} {seconds:7.2f} s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'n':>3}  {'method':<16} {'peftc s':>8} {'peak MB':>8} {'bound MB':>9} {'peft s':>7} {'peftc/peft':>10}")
    for r in rows:
        peft = f"{r['peft_s']:7.2f}" if r["peft_s"] is not None else "      -"
        ratio = f"{r['peftc_s'] / r['peft_s']:9.1f}×" if r["peft_s"] else "         -"
        print(
            f"{r['count']:>3}  {r['method']:<16} {r['peftc_s']:8.2f} {r['peak_mb']:8.0f} {r['bound_mb']:9.0f} {peft} {ratio}"
        )
    eight = [r for r in rows if r["count"] == 8]
    if eight:
        worst = max(eight, key=lambda r: r["peftc_s"])
        verdict = "met" if worst["peftc_s"] <= GOAL_SECONDS else "missed"
        print(f"goal: 8 adapters ≤ {GOAL_SECONDS:.0f} s with every method: slowest {worst['method']} "
              f"{worst['peftc_s']:.2f} s — goal {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
