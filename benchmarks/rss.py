"""Peak memory of a compile against the size of the model it compiles.

Run from the repository root (alone: another process's load does not change RSS, but it slows the run)::

    python benchmarks/rss.py [--model examples.minilm:model] [--adapter examples/minilm-lora] [--target onnx]
                             [--no-merge] [--json]

It runs ``peftc compile MODEL --adapter ADAPTER -o TMP --target TARGET`` in a child process and reads the
child's peak resident set size (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``; this script imports
neither torch nor peftc, so no other child counts). The model's fp32 weight bytes are measured in a second
child: 4 bytes per element of every floating-point parameter and buffer of the loaded module. The ratio
peak RSS / fp32 weight bytes is the number the goal (at most 3) is stated in.

The peak includes the Python interpreter, torch, transformers, onnx and onnxruntime themselves (about
400-500 MB on CPU before any model is loaded), so for a small model the ratio is dominated by them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 3.0

WEIGHT_BYTES = """
import sys, torch
from peftc.loaders.models import load_model
module = load_model(sys.argv[1]).module
tensors = [*module.parameters(), *module.buffers()]
print(sum(4 * t.numel() for t in tensors if t.is_floating_point()))
"""

BASELINE = """
import torch, transformers, onnx, onnxruntime, peft, peftc.driver.pipeline
"""


def child_peak(argv: list[str]) -> tuple[int, float, str]:
    """``(peak RSS bytes, seconds, stderr tail)`` of ``argv`` run as a child (peaks of earlier children
    are excluded by running each measurement from a fresh parent)."""
    script = (
        "import resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
        "time.perf_counter() - start)\n"
        "sys.stderr.write(p.stderr[-2000:])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, check=True)
    code, peak, seconds = result.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{result.stderr}")
    return int(peak), float(seconds), result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples.minilm:model")
    parser.add_argument("--adapter", default="examples/minilm-lora")
    parser.add_argument("--target", default="onnx")
    parser.add_argument("--no-merge", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    python = sys.executable
    weights = int(subprocess.run([python, "-c", WEIGHT_BYTES, args.model], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])  # fmt: skip
    baseline, _, _ = child_peak([python, "-c", BASELINE])
    with tempfile.TemporaryDirectory(prefix="peftc-rss-") as tmp:
        command = [python, "-m", "peftc.cli", "compile", args.model, "--adapter", args.adapter]
        command += ["-o", str(Path(tmp) / "out"), "--target", args.target, *(["--no-merge"] if args.no_merge else [])]
        start = time.perf_counter()
        peak, _, _ = child_peak(command)
        seconds = time.perf_counter() - start
    result = {
        "model": args.model,
        "adapter": args.adapter,
        "target": args.target,
        "merge": not args.no_merge,
        "fp32_weight_bytes": weights,
        "imports_peak_bytes": baseline,
        "compile_peak_bytes": peak,
        "ratio": peak / weights,
        "ratio_above_imports": (peak - baseline) / weights,
        "goal": GOAL,
        "seconds": seconds,
        "self_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mb = 1 << 20
    print(f"fp32 weights     {weights / mb:8.1f} MiB  ({args.model})")
    print(f"imports alone    {baseline / mb:8.1f} MiB  (python + torch, transformers, onnx, onnxruntime, peft)")
    print(f"compile peak     {peak / mb:8.1f} MiB  ({args.target}, {'merged' if not args.no_merge else 'unmerged'}, "
          f"{seconds:.0f} s)")  # fmt: skip
    print(
        f"ratio            {peak / weights:8.2f} x  (goal <= {GOAL:g}); above the imports {result['ratio_above_imports']:.2f} x"
    )


if __name__ == "__main__":
    main()
