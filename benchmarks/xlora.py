"""X-LoRA's cost: the compiled artifact (scaling pass + classifier + gated experts) against PEFT's eager
``XLoraModel`` and against the same model compiled with one plain LoRA expert (unmerged).

Run from the repository root (alone: other processes' load slows it)::

    python benchmarks/xlora.py [--hidden 256] [--layers 2] [--batch 4] [--seq 64] [--reps 20] [--threads 1]

A LLaMA from config (``--hidden``, ``--layers``, ``use_cache=False``, seeded), three PEFT LoRA experts
(``init_lora_weights=False``, r=8, on q/v, q/down and up projections), PEFT's X-LoRA around them
(depth 2, layer-wise gates, classifier re-drawn from a seed). Both artifacts are ONNX, compiled with
``--no-merge`` and run by peftc's onnxruntime runner with ``--threads`` threads; eager runs use the
same number of torch threads. Latency: median of ``--reps`` interleaved calls on seeded token ids.
Printed: each path's median and the ratios ``artifact / LoRA artifact`` (the price of the second pass
and the gates) and ``PEFT eager / artifact``. Numbers on the shared development VM are noisy: compare
ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402

import peftc  # noqa: E402
import peftc.backends.ort  # noqa: E402

TARGETS = [["q_proj", "v_proj"], ["q_proj", "down_proj"], ["up_proj"]]


def build(hidden: int, layers: int, work: Path) -> tuple[torch.nn.Module, Path, Path]:
    """The base model, the X-LoRA adapter directory and the first expert's directory."""
    import peft
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * hidden, vocab_size=1000, max_position_embeddings=512, use_cache=False,
    )  # fmt: skip
    base = models._seeded(lambda: transformers.LlamaForCausalLM(config))
    experts = [
        models.make_lora(base, work / f"e{i}", seed=i + 1, r=8, target_modules=t, task_type="CAUSAL_LM")
        for i, t in enumerate(TARGETS)
    ]
    xconfig = peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=hidden, adapters={str(i): str(p) for i, p in enumerate(experts)},
        xlora_depth=2, xlora_size=64, layerwise_scalings=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), xconfig)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in model.base_model.internal_xlora_classifier.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    model.save_pretrained(str(work / "xlora"))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "internal_xlora_classifier" in k}
    save_file(state, str(work / "xlora" / "adapter_model.safetensors"))
    return base, work / "xlora", experts[0]


def main() -> None:
    """Compile both artifacts, time the four paths interleaved, print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 256), ("layers", 2), ("batch", 4), ("seq", 64), ("reps", 20), ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peftc.backends.ort.DEFAULT_THREADS = args.threads
    work = Path(tempfile.mkdtemp(prefix="peftc-xlora-bench-"))
    base, xlora, expert = build(args.hidden, args.layers, work)
    started = time.perf_counter()
    mixed = peftc.load(peftc.compile(base, xlora, out=work / "x-art", merge=False).path)
    compile_s = time.perf_counter() - started
    single = peftc.load(peftc.compile(base, expert, out=work / "l-art", merge=False).path)
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(xlora)).eval()
    inputs = models.text_inputs(args.batch, args.seq, vocab=1000)
    paths = {
        "X-LoRA artifact": lambda: mixed(**inputs),
        "LoRA artifact": lambda: single(**inputs),
        "PEFT X-LoRA eager": lambda: eager(**inputs),
        "base eager": lambda: base(**inputs),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for fn in paths.values():
            fn()
        for _ in range(args.reps):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, {args.threads} thread(s)")
    print(f"X-LoRA compile (ONNX, --no-merge): {compile_s:.1f} s")
    for name, ms in median.items():
        print(f"  {name:20s} {ms:8.2f} ms")
    print(f"X-LoRA artifact / LoRA artifact: {median['X-LoRA artifact'] / median['LoRA artifact']:.2f}x")
    print(f"PEFT X-LoRA eager / X-LoRA artifact: {median['PEFT X-LoRA eager'] / median['X-LoRA artifact']:.2f}x")


if __name__ == "__main__":
    main()
