"""Peak memory of a compile against the size of the model it compiles.

Run from the repository root (alone: another process's load does not change RSS, but it slows the run)::

    python benchmarks/rss.py [--model examples.minilm:model] [--adapter examples/minilm-lora] [--target onnx]
                             [--no-merge] [--stages] [--verify] [--json]
    python benchmarks/rss.py --synthetic [--layers 12] ...   # a BERT-base-sized model read from disk
    python benchmarks/rss.py --bigfile [--depth 20] [--compile] [--json]  # read paths on a ~1 GB file

It runs ``peftc compile MODEL --adapter ADAPTER -o TMP --target TARGET`` in a child process and reads the
child's peak resident set size (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``; this script imports
neither torch nor peftc, so no other child counts). The model's fp32 weight bytes are measured in a second
child: 4 bytes per element of every floating-point parameter and buffer of the loaded module. The ratio
peak RSS / fp32 weight bytes is the number the goal (at most 3) is stated in.

``--synthetic`` writes a seeded BERT (hidden 768, 12 layers, 109.8M parameters: 439 MB in fp32, the size of
bert-base-uncased) as a Hugging Face safetensors directory in a temporary directory, with a PEFT LoRA adapter
(r=8 on query/value, non-zero B), and compiles that: the model is read from disk as a user's is.
``--stages`` also runs the compile through ``peftc.compile`` in a child whose progress callback reads the
kernel's peak RSS of each stage and pass (``VmHWM`` of ``/proc/self/status``, reset between stages by
writing 5 to ``/proc/self/clear_refs``; Linux only) and prints where the peak is reached; it sets malloc's mmap
threshold as ``peftc compile`` does (``peftc.memory.map_large_blocks``). ``--verify`` also runs ``peftc verify``
on the compiled artifact in a child and reports its peak the same way.

``--bigfile`` measures reading alone (header validation, hashing, the adapter reader, the ``timm:`` and
Hugging Face model loaders) on a ~1 GB safetensors file, each in a child whose peak above its imports is
divided by the file size (``benchmarks/rss_files.py``).

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

SYNTHETIC = """
import sys, torch, transformers, peft
out = sys.argv[1]
torch.manual_seed(0)
config = transformers.BertConfig(hidden_size=768, num_hidden_layers=int(sys.argv[2]), num_attention_heads=12,
                                 intermediate_size=3072, architectures=["BertModel"])
model = transformers.BertModel(config).eval()
model.save_pretrained(out + "/model", safe_serialization=True)
lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
with torch.no_grad():
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
lora.save_pretrained(out + "/adapter")
"""

STAGES = """
import json, sys

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}

rows, current = [], ["imports"]

def progress(message):
    now = status()
    rows.append({"stage": current[0], "peak_bytes": now["VmHWM"], "after_bytes": now["VmRSS"]})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    current[0] = message

import torch, transformers, onnx, onnxruntime, peft, peftc, peftc.driver.pipeline
peftc.memory.map_large_blocks()  # as `peftc compile` does
progress("start")
model, adapter, out, target, merge = sys.argv[1:]
peftc.compile(model, adapter, out=out, target=target, merge=merge == "1", progress=progress)
progress("end")
print(json.dumps(rows[1:]))
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
    parser.add_argument("--synthetic", action="store_true", help="a seeded BERT-base-sized model read from disk")
    parser.add_argument("--layers", type=int, default=12, help="--synthetic's number of layers")
    parser.add_argument("--target", default="onnx")
    parser.add_argument("--no-merge", action="store_true")
    parser.add_argument("--stages", action="store_true", help="also the peak RSS of each stage (Linux)")
    parser.add_argument("--verify", action="store_true", help="also the peak RSS of `peftc verify` on the artifact")
    parser.add_argument("--bigfile", action="store_true", help="peftc's read paths on a ~1 GB file (Linux)")
    parser.add_argument("--depth", type=int, default=20, help="--bigfile's ViT-L/BERT-large depth (20: ~1 GB)")
    parser.add_argument("--compile", action="store_true", help="--bigfile: also compile the ~1 GB BERT with a LoRA")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.bigfile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import rss_files

        def compile_with(model: Path, adapter: Path) -> dict:
            args.model, args.adapter = str(model), str(adapter)
            return measure(args, model.parent)

        result = rss_files.bigfile(args.depth, compile_with if args.compile else None)
        print(json.dumps(result, indent=2)) if args.json else rss_files.report(result, report)
        return
    with tempfile.TemporaryDirectory(prefix="peftc-rss-") as tmp:
        if args.synthetic:
            subprocess.run([sys.executable, "-c", SYNTHETIC, tmp, str(args.layers)], capture_output=True, check=True)
            args.model, args.adapter = str(Path(tmp) / "model"), str(Path(tmp) / "adapter")
        result = measure(args, Path(tmp))
        if args.stages:
            command = [sys.executable, "-c", STAGES, args.model, args.adapter, str(Path(tmp) / "staged"), args.target]
            run = subprocess.run([*command, "0" if args.no_merge else "1"], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"the staged compile failed ({run.returncode}):\n{run.stderr[-2000:]}")
            result["stages"] = json.loads(run.stdout.splitlines()[-1])
    if args.json:
        print(json.dumps(result, indent=2))
        return
    report(result)


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    """The peak RSS of ``peftc compile`` (the CLI, in a child), of the imports alone, and the weight bytes."""
    python = sys.executable
    weights = int(subprocess.run([python, "-c", WEIGHT_BYTES, args.model], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])  # fmt: skip
    baseline, _, _ = child_peak([python, "-c", BASELINE])
    command = [python, "-m", "peftc.cli", "compile", args.model, "--adapter", args.adapter]
    command += ["-o", str(tmp / "out"), "--target", args.target, *(["--no-merge"] if args.no_merge else [])]
    start = time.perf_counter()
    peak, _, _ = child_peak(command)
    seconds = time.perf_counter() - start
    verified = {}
    if getattr(args, "verify", False):
        verify_peak, verify_seconds, _ = child_peak([python, "-m", "peftc.cli", "verify", str(tmp / "out")])
        verified = {
            "verify_peak_bytes": verify_peak,
            "verify_ratio": verify_peak / weights,
            "verify_seconds": verify_seconds,
        }
    return {
        "model": "synthetic BERT-base" if args.synthetic else args.model,
        "adapter": "synthetic LoRA r=8 query/value" if args.synthetic else args.adapter,
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
        **verified,
    }


def report(result: dict) -> None:
    """The human-readable form of ``result``."""
    mb, weights, peak, baseline = (
        1 << 20,
        result["fp32_weight_bytes"],
        result["compile_peak_bytes"],
        result["imports_peak_bytes"],
    )
    merged = "merged" if result["merge"] else "unmerged"
    print(f"fp32 weights     {weights / mb:8.1f} MiB  ({result['model']})")
    print(f"imports alone    {baseline / mb:8.1f} MiB  (python + torch, transformers, onnx, onnxruntime, peft)")
    print(f"compile peak     {peak / mb:8.1f} MiB  ({result['target']}, {merged}, {result['seconds']:.0f} s)")
    print(
        f"ratio            {result['ratio']:8.2f} x  (goal <= {GOAL:g}); above the imports {result['ratio_above_imports']:.2f} x"
    )
    if "verify_peak_bytes" in result:
        above = (result["verify_peak_bytes"] - baseline) / weights
        print(
            f"verify peak      {result['verify_peak_bytes'] / mb:8.1f} MiB  ({result['verify_ratio']:.2f} x; "
            f"above the imports {above:.2f} x; {result['verify_seconds']:.0f} s)"
        )
    if "stages" in result:
        print("\npeak MiB  after MiB  (x weights above the imports)  stage (peak reached while it ran)")
        for row in result["stages"]:
            above = (row["peak_bytes"] - baseline) / weights
            print(f"{row['peak_bytes'] / mb:8.0f}  {row['after_bytes'] / mb:9.0f}  {above:8.2f}  {row['stage']}")


if __name__ == "__main__":
    main()
