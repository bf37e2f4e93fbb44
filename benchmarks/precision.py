"""Every precision × target of peftc against eager PyTorch and PEFT, timed interleaved (paired ratios).

Run from the repository root, alone on the machine (see benchmarks/README.md)::

    python benchmarks/precision.py [--model minilm|bert-base] [--reps N] [--reps8 N] [--paths a,b] [--larger 16,32] [--json]

The model (the bundled MiniLM with its adapter, or a ~110M BERT-base built from its config, seeded,
with a PEFT-made LoRA r=16 on every linear) is compiled merged for each path below, and every path is
timed at batch 1 and 8 (seq 128) with the method of ``compile_minilm.py``: shuffled order, each path
called twice and the second call timed, ratios = medians of per-repetition ratios.

=====================  ==========================================================================
path                   what runs
=====================  ==========================================================================
peft_eager_unmerged    ``PeftModel.from_pretrained`` on the fp32 base (the reference of every ratio)
eager_base             the fp32 base model
eager_base_bf16        the base model in bf16
onnx_fp32, onnx_fp16   ``--target onnx --precision fp32|fp16`` (onnxruntime, CPU)
aoti_fp32, aoti_bf16   ``--target aoti --precision fp32|bf16`` (AOTInductor, CPU, frozen weights)
aoti_fp16              ``--target aoti --precision fp16``
onnx_int8              ``--target onnx --precision int8`` (dynamic int8, layer search at the default budget)
onnx_int8_static       ``--precision int8-static`` (calibrated on 64 generated batches)
onnx_int8_weight       ``--precision int8-weight``; onnx_int4: ``--precision int4`` (MatMulNBits)
aoti_int8              ``--target aoti --precision int8`` (torchao PT2E, dynamic; oneDNN int8 kernels)
aoti_int8_static       ``--target aoti --precision int8-static`` (calibrated on 64 generated batches)
…_e0.1                 the same with ``--max-error 0.1`` (a user's 10 % budget)
=====================  ==========================================================================

Each path's error is measured against the fp32 PEFT model (max abs, and relative to max|y| of
``last_hidden_state``) next to the budget its manifest verified it within. The CPU's ISA flags are
printed with the numbers. Goals (issue 13, on the 2-vCPU AVX-512/AMX VM): the best artifact ≥ 4×
PEFT eager unmerged at b1 and b8 within its budget; int8 ≥ 5×; the default CPU artifact ≥ 1.3× PEFT
eager and never slower than the eager base. An integer precision whose layer search cannot meet its
budget is listed as not built, with the reason.
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
from peftc import machine
from peftc.errors import PeftcError

REFERENCE = "peft_eager_unmerged"
COMPILED: dict[str, tuple[str, str, float | None]] = {
    "onnx_fp32": ("onnx", "fp32", None),
    "onnx_fp16": ("onnx", "fp16", None),
    "aoti_fp32": ("aoti", "fp32", None),
    "aoti_bf16": ("aoti", "bf16", None),
    "aoti_fp16": ("aoti", "fp16", None),
    "onnx_int8": ("onnx", "int8", None),
    "onnx_int8_e0.1": ("onnx", "int8", 0.1),
    "onnx_int8_static": ("onnx", "int8-static", None),
    "onnx_int8_static_e0.1": ("onnx", "int8-static", 0.1),
    "onnx_int8_weight": ("onnx", "int8-weight", None),
    "onnx_int4": ("onnx", "int4", None),
    "aoti_int8": ("aoti", "int8", None),
    "aoti_int8_e0.1": ("aoti", "int8", 0.1),
    "aoti_int8_static": ("aoti", "int8-static", None),
    "aoti_int8_static_e0.1": ("aoti", "int8-static", 0.1),
}
"""path → (target, precision, --max-error); ``_eE`` paths take a user's budget of E instead of the default."""


def model_and_adapter(name: str, root: Path) -> tuple[Any, str]:
    """The base spec or module and a PEFT adapter directory for it."""
    if name == "minilm":
        return common.MODEL_SPEC, common.DEFAULT_ADAPTER
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig()).eval()
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(str(root / "adapter"))
    return base, str(root / "adapter")


def load_base(model: Any) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    from examples.minilm import model as minilm

    return minilm().eval()


def compile_paths(
    model: Any, adapter: str, names: list[str], root: Path, failed: dict[str, str]
) -> dict[str, tuple[Any, dict]]:
    """path name → (runner, its manifest's precision record), compiling each; a path whose compile
    fails (an integer precision that cannot meet its budget) goes into ``failed`` with the reason."""
    runners = {}
    for name in names:
        target, precision, max_error = COMPILED[name]
        common.log(f"== compile {name}")
        start = time.perf_counter()
        try:
            artifact = peftc.compile(
                model, adapter, out=root / name, target=target, precision=precision, max_error=max_error, force=True
            )
        except PeftcError as e:
            failed[name] = str(e).splitlines()[0]
            common.log(f"   failed: {failed[name]}")
            continue
        common.log(f"   {time.perf_counter() - start:.1f} s")
        record = artifact.manifest.target["precision"]
        quantization = record.get("quantization")
        if quantization:
            common.log(f"   {quantization['quantized']} of {len(quantization['layers'])} layers quantized")
        runners[name] = (peftc.load(artifact.path), record)
    return runners


def run(model_name: str, names: list[str], reps: int, reps8: int, larger: tuple[int, ...] = ()) -> dict[str, Any]:
    from peft import PeftModel

    torch.set_num_threads(2)
    result: dict[str, Any] = {"model": model_name, "cpu": machine.cpu(), "seq": common.SEQ, "batches": {}}
    result["failed"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, adapter = model_and_adapter(model_name, Path(tmp))
        compiled = compile_paths(model, adapter, names, Path(tmp), result["failed"])
        base = load_base(model)
        eager: dict[str, torch.nn.Module] = {
            REFERENCE: PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval(),
            "eager_base": base,
            "eager_base_bf16": copy.deepcopy(base).bfloat16(),
        }
        result["budgets"] = {name: record["budget"] for name, (_, record) in compiled.items()}
        result["quantized"] = {
            name: f"{q['quantized']}/{len(q['layers'])}"
            for name, (_, record) in compiled.items()
            if (q := record.get("quantization"))
        }
        with torch.no_grad():
            for batch, count in ((1, reps), (8, reps8), *((b, max(2, reps8 // 2)) for b in larger)):
                if count > 0:
                    ids, mask = common.make_inputs(batch, base.config.vocab_size)
                    calls = _calls(eager, {k: v for k, (v, _) in compiled.items()}, ids, mask)
                    result["batches"][batch] = measure(calls, count)
    return result


def _calls(
    eager: Mapping[str, torch.nn.Module], runners: Mapping[str, Any], ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, Callable[[], Any]]:
    torch_in = {"input_ids": ids, "attention_mask": mask}
    numpy_in = {k: v.numpy() for k, v in torch_in.items()}
    calls: dict[str, Callable[[], Any]] = {name: (lambda m=m: m(**torch_in)) for name, m in eager.items()}
    calls.update({name: (lambda r=r: r(**numpy_in)) for name, r in runners.items()})
    return calls


def measure(calls: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, Any]:
    expected = _hidden(calls[REFERENCE]())
    scale = float(np.abs(expected).max())
    errors = {}
    for name, call in calls.items():
        diff = float(np.abs(_hidden(call()) - expected).max())
        errors[name] = {"max_abs": diff, "rel": diff / scale}
    common.log(f"   timing {len(calls)} paths x {reps} reps")
    times = common.time_interleaved(calls, reps, random.Random(common.ORDER_SEED))
    return {
        "median_ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
        "vs_peft": {k: common.paired_ratio(times, REFERENCE, k) for k in calls if k != REFERENCE},
        "vs_eager_base": {k: common.paired_ratio(times, k, "eager_base") for k in calls if k != "eager_base"},
        "error_vs_fp32_peft": errors,
    }


def _hidden(outputs: Any) -> np.ndarray:
    value = outputs["last_hidden_state"]
    value = value.detach().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return value.astype(np.float64)


def report(result: Mapping[str, Any]) -> None:
    cpu = result["cpu"]
    print(
        f"{result['model']}, seq {result['seq']}; CPU {cpu.get('model')} ({cpu.get('cores')} threads), {cpu.get('isa')}"
    )
    for batch, data in result["batches"].items():
        print(f"\nbatch {batch}")
        print(
            f"{'path':22s} {'ms':>8s} {'PEFT / path':>18s} {'path / base':>18s} {'rel err':>9s} {'budget':>9s} "
            f"{'int8/4 layers':>7s}"
        )
        for name, ms in data["median_ms"].items():
            peft = data["vs_peft"].get(name)
            base = data["vs_eager_base"].get(name)
            cell = lambda r: f"{r['median']:.2f}x [{r['q1']:.2f}-{r['q3']:.2f}]" if r else "-"  # noqa: E731
            budget = result["budgets"].get(name)
            print(
                f"{name:22s} {ms:8.1f} {cell(peft):>18s} {cell(base):>18s} "
                f"{data['error_vs_fp32_peft'][name]['rel']:9.2e} {('-' if budget is None else f'{budget:.2e}'):>9s}"
                f" {result['quantized'].get(name, ''):>7s}"
            )
    for name, why in result["failed"].items():
        print(f"\n{name}: not built: {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    parser.add_argument(
        "--paths", default=",".join(COMPILED), help=f"compiled paths (default all: {','.join(COMPILED)})"
    )
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions at batch 1 (default 20)")
    parser.add_argument("--reps8", type=int, default=6, help="interleaved repetitions at batch 8 (default 6; 0 skips)")
    parser.add_argument("--larger", default="", help="more batch sizes, e.g. 16,32 (half the batch-8 repetitions)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    larger = tuple(int(b) for b in args.larger.split(",") if b)
    result = run(args.model, [p for p in args.paths.split(",") if p], args.reps, args.reps8, larger)
    print(json.dumps(result, indent=2)) if args.json else report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
