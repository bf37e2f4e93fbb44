"""Generation speed of a ``--task text-generation`` artifact against PEFT's own ``generate`` (issue 15).

Run from the repository root::

    python benchmarks/generate.py [--quick] [--json] [--seq2seq]

(``--seq2seq``: an encoder-decoder T5 instead, ``benchmarks/generate_seq2seq.py``.)

A LLaMA-style model from a config (about 100M parameters; ``--quick``: about 6M) with a LoRA of rank
16 on q/k/v/o (``init_lora_weights=False``) is compiled merged to ONNX (fp32, onnxruntime CPU). For
prompts of 32 and 512 tokens and batches of 1 and 8 it generates 64 new tokens (greedy) three ways:

* ``artifact``: ``runner.generate`` (prefill, then one decode step per token with the KV cache);
* ``peft``: ``PeftModel.generate`` in fp32 eager PyTorch, with its own cache;
* ``re-feed``: the same artifact run on the whole prefix at every token (no cache): what generating
  cost before generation artifacts; timed over 8 tokens and reported per token.

It also times one decode step (batch 1) after a prefix of 512 and of 32 tokens, the two interleaved:
with a dynamic past length a step attends over ``total`` keys only, so the ratio stays near 1 while the
projections dominate (goal: <= 1.3). ``call`` is ``runner(...)`` with fp32 arrays; ``native``
(AOTInductor) is the step as ``runner.generate`` runs it after the prefill, the caches passed on in the
package's dtype. ``--steps-only``: only these step times (no generate rows, no PEFT). Timings are
medians of repeats on a shared machine: noisy, compare ratios from one run.

``--target aoti --precision fp32,bf16 --prompts 32``: the same rows for AOTInductor packages (one
compile per precision, minutes each for the 100M model on a small CPU; onnxruntime's CPU kernels have
no bf16), without the re-feed column. Every row also counts the new tokens equal to PEFT fp32's
greedy ones before a row's first difference (bf16 may legitimately diverge once two logits are
closer than its rounding), and the header gives the compile's verification: the logits' largest
error against fp32 PEFT relative to max|logits|, and the bf16 budget ``u·√(3·depth)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NEW = 64


def _model(quick: bool) -> torch.nn.Module:
    import transformers

    size = (
        {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 688, "vocab_size": 8000}
        if quick
        else {"hidden_size": 768, "num_hidden_layers": 8, "intermediate_size": 2048, "vocab_size": 32000}
    )
    config = transformers.LlamaConfig(
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, **size
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _adapter(model: torch.nn.Module, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(copy.deepcopy(model), config).save_pretrained(str(path))
    return path


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _refeed(runner, ids: np.ndarray, tokens: int) -> float:
    """Seconds per token generating ``tokens`` tokens by running the whole prefix each time."""
    empty = {
        n: np.zeros((ids.shape[0], *_kv(runner, n)), np.float32) for n in runner.input_names if n.startswith("past_")
    }
    start = time.perf_counter()
    for _ in range(tokens):
        mask = np.ones_like(ids)
        out = runner(input_ids=ids, attention_mask=mask, position_ids=np.cumsum(mask, 1) - 1, **empty)
        ids = np.concatenate([ids, out["logits"][:, -1].argmax(-1)[:, None]], axis=1)
    return (time.perf_counter() - start) / tokens


def _kv(runner, name: str) -> tuple[int, int, int]:
    spec = next(s for s in runner.manifest.target["signature"]["inputs"] if s["name"] == name)
    return spec["shape"][1], 0, spec["shape"][3]


def _step_feeds(runner, prefix: int, native: bool) -> dict:
    """Decode-step feeds (batch 1) after ``prefix`` cached tokens; ``native``: the caches as torch tensors
    in the package's dtype, as ``runner.generate`` passes them from one AOTInductor step to the next."""
    specs = {s["name"]: s for s in runner.manifest.target["signature"]["inputs"]}
    dtypes = {i["name"]: i.get("dtype") for i in runner.manifest.target.get("inputs", ())}
    feeds = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, prefix + 1), np.int64)}
    feeds["position_ids"] = np.array([[prefix]])
    for name in (n for n in runner.input_names if n.startswith("past_")):
        shape = (1, specs[name]["shape"][1], prefix, specs[name]["shape"][3])
        past = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        feeds[name] = torch.from_numpy(past).to(getattr(torch, dtypes[name])) if native else past
    return feeds


def _steps(runner, repeats: int) -> dict:
    """Median seconds of one decode step (batch 1) after 32 and after 512 cached tokens, the two lengths
    interleaved: ``call`` through ``runner(...)`` with fp32 arrays, and (AOTInductor) ``native`` as
    ``runner.generate`` runs its decode steps (``decode.native_step``: caches in the package's dtype)."""
    from peftc.generation import decode

    native = getattr(runner.backend_runner, "run_tensors", None)
    kinds = {"call": lambda feeds: runner(**feeds)}
    if native is not None:
        kinds["native"] = lambda feeds: decode.native_step(native, feeds)
    feeds = {(k, p): _step_feeds(runner, p, k == "native") for k in kinds for p in (32, 512)}
    times = {key: [] for key in feeds}
    for repeat in range(repeats + 2):  # two untimed rounds: the first call at a past length sets kernels up
        for (kind, prefix), feed in feeds.items():
            start = time.perf_counter()
            kinds[kind](feed)
            if repeat >= 2:
                times[kind, prefix].append(time.perf_counter() - start)
    out = {}
    for kind in kinds:
        short, long = statistics.median(times[kind, 32]), statistics.median(times[kind, 512])
        out[kind] = {"prefix_32": short, "prefix_512": long, "ratio": long / short}
    return out


def _peft_tokens(peft_model, ids: np.ndarray) -> tuple[float, np.ndarray]:
    """Seconds of ``PeftModel.generate`` (fp32, its own cache, 64 tokens) and its tokens."""
    tensor = torch.from_numpy(ids)
    out = []
    with torch.no_grad():  # warm, like the artifact
        peft_model.generate(input_ids=tensor, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad():
            out.append(
                peft_model.generate(
                    input_ids=tensor, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
                )
            )

    return _timed(run, 1 if ids.shape[0] * ids.shape[1] > 2048 else 2), out[-1].numpy()


def _agreement(got: np.ndarray, expected: np.ndarray, prompt: int) -> float:
    """Mean count of new tokens equal to PEFT fp32's before a row's first difference."""
    same = got[:, prompt:] == expected[:, prompt:]
    return float(np.where(same.all(1), same.shape[1], same.argmin(1)).mean())


def _worst_vs_peft(manifest) -> float:
    """The largest max_rel of the artifact against fp32 PEFT over the compile's verification cases."""
    cases = [c for c in manifest.verification["cases"] if c["oracle"] == "peft"]
    return max(o["max_rel"] for c in cases for o in c["outputs"] if o["name"] == "logits")


def _artifact_rows(runner, peft_model, prompts, repeats: int, refeed: bool) -> list[dict]:
    rows = []
    for prompt in prompts:
        for batch in (1, 8):
            ids = np.random.default_rng(prompt + batch).integers(3, 1000, (batch, prompt))
            tokens = []
            runner.generate(ids, max_new_tokens=NEW)  # warm: the first call of each past length sets kernels up
            art = _timed(
                lambda ids=ids, tokens=tokens: tokens.append(runner.generate(ids, max_new_tokens=NEW)), repeats
            )
            eager, expected = _peft_tokens(peft_model, ids)
            per_token = _refeed(runner, ids, 8) if refeed else float("nan")
            rows.append({
                "prompt": prompt, "batch": batch, "artifact_tok_s": batch * NEW / art, "peft_tok_s": batch * NEW / eager,
                "refeed_tok_s": batch / per_token, "artifact_vs_peft": eager / art,
                "tokens_before_first_difference": _agreement(np.asarray(tokens[-1]), expected, prompt),
            })  # fmt: skip
    return rows


def main() -> None:
    """Print the table (or ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 6M model, fewer repeats")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seq2seq", action="store_true", help="a T5 text2text-generation artifact instead")
    parser.add_argument("--target", default="onnx", choices=("onnx", "aoti"))
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16 (bf16: --target aoti)")
    parser.add_argument("--prompts", default="32,512", help="comma-separated prompt lengths")
    parser.add_argument("--steps-only", action="store_true", help="only the decode-step times at prefix 32 / 512")
    args = parser.parse_args()
    if args.seq2seq:
        import generate_seq2seq

        return generate_seq2seq.run(args.quick, args.json, _timed)
    from peft import PeftModel

    import peftc

    model = _model(args.quick)
    params = sum(p.numel() for p in model.parameters())
    repeats = 1 if args.quick else 2
    prompts = [int(p) for p in args.prompts.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _adapter(model, Path(tmp) / "lora")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
        for precision in args.precision.split(","):
            out = Path(tmp) / f"out-{precision}"
            start = time.perf_counter()
            artifact = peftc.compile(
                model, adapter, out=out, task="text-generation", target=args.target, precision=precision
            )
            compile_s = time.perf_counter() - start
            runner = peftc.load(out)
            rows = (
                [] if args.steps_only else _artifact_rows(runner, peft_model, prompts, repeats, args.target == "onnx")
            )
            steps = _steps(runner, 20)
            budget = artifact.manifest.target["precision"]["budget"]
            results.append({
                "target": args.target, "precision": precision, "compile_s": compile_s, "rows": rows,
                "logits_max_rel_vs_peft_fp32": _worst_vs_peft(artifact.manifest), "budget": budget,
                "step_s": steps,
            })  # fmt: skip
            if not args.json:
                _print(params, results[-1])  # each precision as soon as it is measured
            del runner
    if args.json:
        print(json.dumps({"parameters": params, "results": results}, indent=2))


def _print(params: int, result: dict) -> None:
    budget = result["budget"]
    print(
        f"LLaMA-style {params / 1e6:.0f}M parameters, LoRA r16 merged, {result['target']} {result['precision']}; "
        f"compile {result['compile_s']:.0f} s; logits vs PEFT fp32 (verification) max rel "
        f"{result['logits_max_rel_vs_peft_fp32']:.2e}" + (f" (budget {budget:.2e})" if budget else "")
    )
    if result["rows"]:
        print(
            f"{'prompt':>6} {'batch':>5} {'artifact tok/s':>15} {'PEFT tok/s':>11} {'re-feed tok/s':>14} "
            f"{'vs PEFT':>8} {'same tokens':>11}"
        )
    for r in result["rows"]:
        print(
            f"{r['prompt']:>6} {r['batch']:>5} {r['artifact_tok_s']:>15.1f} {r['peft_tok_s']:>11.1f} "
            f"{r['refeed_tok_s']:>14.1f} {r['artifact_vs_peft']:>7.2f}x {r['tokens_before_first_difference']:>8.1f}/{NEW}"
        )
    for kind, step in result["step_s"].items():
        print(f"decode step (batch 1, {kind}): prefix 32 {step['prefix_32'] * 1e3:.2f} ms, prefix 512 "
              f"{step['prefix_512'] * 1e3:.2f} ms, ratio {step['ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
