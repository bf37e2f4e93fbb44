"""Compare peftc's targets on the same adapted model, timed interleaved (paired ratios).

Run from the repository root, alone on the machine (see benchmarks/README.md)::

    python benchmarks/targets.py [--reps N] [--reps8 N] [--json]        # CPU part
    python benchmarks/targets.py --gpu [--reps N] [--json]               # GPU part (needs CUDA)

**CPU part** (the bundled MiniLM example, seq 128, batch 1 and 8): ``eager_base`` (plain BertModel),
``peft_eager_unmerged`` (``PeftModel.from_pretrained``), ``onnx_merged`` and ``aoti_merged`` (the
artifacts of ``peftc.compile(..., target="onnx"|"aoti")``, run through ``peftc.load``). Each
repetition shuffles the paths, calls each twice and times the second call; a ratio is the median over
repetitions of the paired per-repetition ratio (``compile_minilm.py`` explains why). Compile wall
times and every path's max abs error against PEFT are reported too.

**GPU part** (``--gpu [--gpu-targets aoti,trt] [--precisions fp16,bf16]``; needs a CUDA build of torch
and a GPU, and TensorRT for the trt rows): a ~110M-parameter BERT-base built from its config (seeded),
LoRA r=16 on every linear made by PEFT, seq 128, batch 1/8/32: ``peft_eager_unmerged`` (fp16, the
reference of every ratio), ``peft_eager_fp32`` (the reference of every error), ``torch_compile_merged``
(``torch.compile`` of the merged fp16 model), and per precision P ``aoti_cuda_P`` (``--target aoti
--device cuda --precision P``) and ``trt_P`` (``--target trt --precision P``); a path that cannot be
built is listed as not run with the reason. Timings use CUDA synchronisation. The goal is ≥ 2× over
PEFT eager unmerged at batch 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_minilm as common  # the shared timing helpers

import peftc

CPU_PATHS = ("eager_base", "peft_eager_unmerged", "onnx_merged", "aoti_merged")
GOAL = 2.0


def compile_timed(adapter: str, out: Path, target: str, **options: Any) -> tuple[Path, float]:
    common.log(f"== compile {target} {options or ''}")
    start = time.perf_counter()
    artifact = peftc.compile(
        common.MODEL_SPEC,
        adapter,
        out=out,
        target=target,
        force=True,
        progress=lambda m: common.log(f"   {m}"),
        **options,
    )
    wall = time.perf_counter() - start
    common.log(f"   {target}: {wall:.1f} s")
    return Path(artifact.path), wall


def cpu(adapter: str, reps: int, reps8: int) -> dict[str, Any]:
    from peft import PeftModel

    from examples.minilm import model as load_base

    torch.set_num_threads(2)
    result: dict[str, Any] = {"part": "cpu", "adapter": adapter, "seq": common.SEQ, "compile_s": {}, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir, result["compile_s"]["onnx"] = compile_timed(adapter, Path(tmp) / "onnx", "onnx")
        aoti_dir, result["compile_s"]["aoti"] = compile_timed(adapter, Path(tmp) / "aoti", "aoti")
        base = load_base().eval()
        unmerged = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
        onnx_runner, aoti_runner = peftc.load(onnx_dir), peftc.load(aoti_dir)
        with torch.no_grad():
            for batch, count in ((1, reps), (8, reps8)):
                if count <= 0:
                    continue
                ids, mask = common.make_inputs(batch, base.config.vocab_size)
                ids_np, mask_np = ids.numpy(), mask.numpy()
                torch_in = {"input_ids": ids, "attention_mask": mask}
                numpy_in = {"input_ids": ids_np, "attention_mask": mask_np}
                calls: dict[str, Callable[[], Any]] = {
                    "eager_base": _bound(base, torch_in),
                    "peft_eager_unmerged": _bound(unmerged, torch_in),
                    "onnx_merged": _bound(onnx_runner, numpy_in),
                    "aoti_merged": _bound(aoti_runner, numpy_in),
                }
                result["batches"][batch] = measure(calls, count, "peft_eager_unmerged", ("onnx_merged", "aoti_merged"))
    return result


def measure(
    calls: Mapping[str, Callable[[], Any]], reps: int, reference: str, compiled: tuple[str, ...], oracle: str = ""
) -> dict:
    """Paired ratios against ``reference``; max abs errors against ``oracle`` (default: the reference)."""
    oracle = oracle or reference
    errors = max_errors(calls, oracle)
    common.log(f"   timing {len(calls)} paths x {reps} reps")
    times = common.time_interleaved(calls, reps, random.Random(common.ORDER_SEED))
    ratios = {f"{reference} / {name}": common.paired_ratio(times, reference, name) for name in compiled}
    base = next(iter(calls))
    ratios.update({f"{name} / {base}": common.paired_ratio(times, name, base) for name in calls if name != base})
    return {
        "median_ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
        "min_ms": {k: 1e3 * min(v) for k, v in times.items()},
        "ratios": ratios,
        "max_abs_error_vs_" + oracle: errors,
    }


def max_errors(calls: Mapping[str, Callable[[], Any]], reference: str) -> dict[str, float]:
    expected = _numpy(calls[reference]())
    out = {}
    for name, call in calls.items():
        got = _numpy(call())
        out[name] = max(
            float(np.abs(got[k].astype(np.float64) - expected[k].astype(np.float64)).max()) for k in expected
        )
    return out


def _numpy(outputs: Any) -> dict[str, np.ndarray]:
    return {
        k: (v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in outputs.items()
        if v is not None and k in ("last_hidden_state",)
    }


def gpu(reps: int, precisions: tuple[str, ...], targets: tuple[str, ...] = ("aoti", "trt")) -> dict[str, Any]:
    """The GPU part (see the module docstring). Written for the device machine; never run on CPU CI."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from peftc.backends.tensorrt import install as trt_install

    result: dict[str, Any] = {"part": "gpu", "device": torch.cuda.get_device_name(0), "batches": {}, "not_run": {}}
    result["compile_s"] = {}
    torch.manual_seed(0)
    config = transformers.BertConfig()  # BERT-base: 110M parameters
    base = transformers.BertModel(config).eval()
    result["parameters"] = sum(p.numel() for p in base.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        lora = LoraConfig(
            r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"], init_lora_weights=False
        )
        get_peft_model(copy.deepcopy(base), lora).save_pretrained(f"{tmp}/adapter")
        half = copy.deepcopy(base).half().cuda().eval()
        oracle = PeftModel.from_pretrained(copy.deepcopy(base).cuda(), f"{tmp}/adapter").eval()
        unmerged = PeftModel.from_pretrained(copy.deepcopy(half), f"{tmp}/adapter").eval()
        merged = PeftModel.from_pretrained(copy.deepcopy(half), f"{tmp}/adapter").merge_and_unload().eval()
        compiled = torch.compile(merged)
        runners: dict[str, Any] = {}
        chosen = [("aoti_cuda", "aoti", {"device": "cuda"})] if "aoti" in targets else []
        if "trt" in targets and trt_install.find_module() is None:
            result["not_run"]["trt"] = "TensorRT not installed"
        elif "trt" in targets:
            chosen.append(("trt", "trt", {}))
        for label, target, options in chosen:
            for precision in precisions:
                name = f"{label}_{precision}"
                common.log(f"== compile {name}")
                start = time.perf_counter()
                try:
                    art = peftc.compile(
                        base,
                        f"{tmp}/adapter",
                        out=f"{tmp}/{name}",
                        target=target,
                        target_options=options,
                        precision=precision,
                    )
                    runners[name] = peftc.load(art.path)
                    result["compile_s"][name] = time.perf_counter() - start
                except peftc.PeftcError as e:
                    result["not_run"][name] = str(e)
        with torch.no_grad():
            for batch in (1, 8, 32):
                g = torch.Generator().manual_seed(batch)
                ids = torch.randint(100, config.vocab_size, (batch, common.SEQ), generator=g)
                mask = torch.ones_like(ids)
                ids_c, mask_c = ids.cuda(), mask.cuda()
                cuda_in = {"input_ids": ids_c, "attention_mask": mask_c}
                calls: dict[str, Callable[[], Any]] = {
                    "peft_eager_unmerged": _synced(_bound(unmerged, cuda_in)),
                    "peft_eager_fp32": _synced(_bound(oracle, cuda_in)),
                    "torch_compile_merged": _synced(_bound(compiled, cuda_in)),
                }
                for name, runner in runners.items():
                    calls[name] = _synced(_bound(runner, {"input_ids": ids, "attention_mask": mask}))
                result["batches"][batch] = measure(
                    calls, reps, "peft_eager_unmerged", (*runners, "torch_compile_merged"), oracle="peft_eager_fp32"
                )
    return result


def _names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def _bound(fn: Callable[..., Any], inputs: Mapping[str, Any]) -> Callable[[], Any]:
    """A zero-argument call with the inputs already in the path's own type (no conversion timed)."""
    return lambda: fn(**inputs)


def _synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def report(result: Mapping[str, Any]) -> None:
    print(f"{result['part']} part" + (f" on {result['device']}" if "device" in result else ""))
    for target, seconds in result.get("compile_s", {}).items():
        print(f"  compile {target}: {seconds:.1f} s")
    for batch, data in result["batches"].items():
        print(f"  batch {batch}:")
        for name, ms in data["median_ms"].items():
            error = next(v for k, v in data.items() if k.startswith("max_abs"))[name]
            print(f"    {name:24s} median {ms:8.2f} ms  min {data['min_ms'][name]:8.2f} ms  max abs err {error:.2e}")
        for label, r in data["ratios"].items():
            goal = ""
            if label.startswith("peft_eager_unmerged / ") and batch == 1 and result["part"] == "gpu":
                goal = f"  goal >= {GOAL}x: {'met' if r['median'] >= GOAL else 'missed'}"
            print(f"    {label:45s} {r['median']:.2f}x  (IQR {r['q1']:.2f}-{r['q3']:.2f}, n={r['n']}){goal}")
    for name, why in result.get("not_run", {}).items():
        print(f"  not run: {name}: {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=common.DEFAULT_ADAPTER)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--reps8", type=int, default=6)
    parser.add_argument("--gpu", action="store_true", help="run the GPU part instead (needs CUDA)")
    parser.add_argument(
        "--precisions", default="fp16,bf16", help="GPU part: the artifacts' precisions (fp32,fp16,bf16)"
    )
    parser.add_argument("--gpu-targets", default="aoti,trt", help="GPU part: the targets to compile (aoti,trt)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            print(f"GPU part not run: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
            return 2
        result = gpu(args.reps, _names(args.precisions), _names(args.gpu_targets))
    else:
        result = cpu(args.adapter, args.reps, args.reps8)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
