"""QLoRA on an NF4 base: artifact bytes, latency and error of each merge policy against PEFT's eager QLoRA.

Run from the repository root::

    python benchmarks/qlora.py [--quick] [--aoti] [--json]

A LLaMA-style model made from a config (~98M parameters: hidden 768, 12 layers, vocab 8192; ``--quick``:
hidden 256, 2 layers) is saved, loaded by transformers + bitsandbytes in NF4 with double quantization
and saved again; PEFT makes a LoRA adapter (r=16, α=16, every linear of the decoder,
``init_lora_weights=False``) on it. For each ``--merge-policy`` peftc applies the adapter per site
(``peftc/quant/policy.py``) and lowers the model with peftc's ONNX backend (NF4 layers as
``com.microsoft.MatMulBnb4``); ``--aoti`` adds ``auto`` through AOTInductor (a frozen CPU package:
Inductor folds each dequantization into an fp32 constant at compile time).

``--tables`` measures ``peftc compile`` itself instead (the plain forward) under each ``--policies`` merge
policy (default ``auto``; e.g. ``auto,auto-speed``) with each ``--quantize-embeddings`` scheme (none, int8,
int4, int8-head: ``peftc/quant/embeddings.py``; ``--schemes`` picks some), the rows named ``compile POLICY,
tables …``, next to PEFT's eager QLoRA, all of them timed in one interleaved loop; their error column is
against the same fp32 reference, their site error the largest error a table or site adds, their budget
the verification budget against that reference (``peftc/quant/compiled.py``: 3 · √Σ eᵢ² over the site table).
``--absmax kept,fp32`` adds, for each, the artifact with the double-quantized NF4 absmax decoded to fp32 when
the checkpoint is read (as peftc did before keeping the 8-bit codes and decoding them in the graph).

Reported per policy and target: the artifact files' bytes and their ratio to an fp16 artifact of the
same merged model (2 bytes per parameter); for the decoder's linear layers alone (what the policy
decides) their bytes against fp16 (``lin×fp16``: bitsandbytes leaves embeddings, head and norms in
float, fp32 here); latency at batch 1 and 8 (sequence 64, median of interleaved repetitions); the
largest per-site error the policy adds (relative Frobenius, ``policy.py``); and the output error
(max |Δlogits| / max |logits|) against the unmerged QLoRA model in fp32 (peftc's eager two-path model,
which equals PEFT on the dequantized base). PEFT's eager QLoRA model (bitsandbytes CPU kernels) is timed
and its error reported the same way. The machine this runs on is shared and its numbers are noisy;
ratios measured side by side are the ones to read.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftc.quant import qlora
from peftc.quant.modules import Bnb4Linear, Int8Linear, TwoPathLinear

LINEARS = (Bnb4Linear, Int8Linear, TwoPathLinear, torch.nn.Linear)
POLICIES = ("float", "requant", "two-path", "auto")
TABLES = ("none", "int8", "int4", "int8-head")
SEQ = 64


def make(root: Path, quick: bool) -> tuple[Path, Path, int]:
    """The NF4 checkpoint, the PEFT adapter and the parameter count of the float model."""
    import peft
    import transformers

    size = (256, 512, 2, 1024) if quick else (768, 2048, 12, 8192)
    config = transformers.LlamaConfig(
        hidden_size=size[0], intermediate_size=size[1], num_hidden_layers=size[2], vocab_size=size[3],
        num_attention_heads=size[0] // 64, num_key_value_heads=size[0] // 64, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "fp32")
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    base = transformers.LlamaForCausalLM.from_pretrained(root / "fp32", quantization_config=quant, device_map="cpu")
    base.save_pretrained(root / "nf4")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(1)
    peft.get_peft_model(base, lora).save_pretrained(root / "lora")
    return root / "nf4", root / "lora", count


def timed(run, batches: dict[int, torch.Tensor], reps: int, budget_s: float = 120.0) -> dict[int, float]:
    """Median milliseconds per call for each batch size, repetitions interleaved (fewer when one round
    of calls takes more than ``budget_s / reps``: PEFT's eager QLoRA is slow on CPU)."""
    samples: dict[int, list[float]] = {b: [] for b in batches}
    start = time.perf_counter()
    for ids in batches.values():
        run(ids)  # warm-up
    round_s = time.perf_counter() - start
    for _ in range(max(1, min(reps, int(budget_s / max(round_s, 1e-9))))):
        for b, ids in batches.items():
            start = time.perf_counter()
            run(ids)
            samples[b].append((time.perf_counter() - start) * 1e3)
    return {b: statistics.median(v) for b, v in samples.items()}


def main() -> None:
    """Build every policy's artifact, time it and PEFT's eager QLoRA, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few repetitions")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--aoti", action="store_true", help="also compile auto's model with AOTInductor (minutes)")
    parser.add_argument("--max-error", type=float, default=1e-2, help="auto's per-site budget (default 1e-2)")
    parser.add_argument("--tables", action="store_true", help="peftc compile with each --quantize-embeddings instead")
    parser.add_argument("--schemes", default=",".join(TABLES), help="--tables: the schemes, comma-separated")
    parser.add_argument("--policies", default="auto", help="--tables: the merge policies, comma-separated")
    parser.add_argument(
        "--absmax", default="kept", help="--tables: kept (8-bit, decoded in the graph) and/or fp32 (decoded when read)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    reps = 3 if args.quick else 10
    root = Path(tempfile.mkdtemp(prefix="peftc-qlora-"))
    model_dir, adapter, count = make(root, args.quick)
    vocab = 1024 if args.quick else 8192
    gen = torch.Generator().manual_seed(2)
    batches = {b: torch.randint(0, vocab, (b, SEQ), generator=gen) for b in (1, 8)}
    check = batches[8]
    with torch.no_grad():
        reference = qlora.build(model_dir, adapter, "two-path").module(input_ids=check).logits
    if args.tables:
        rows = _compiled_rows(args, model_dir, adapter, root, batches, check, reference, reps)
    else:
        rows = [_peft_row(model_dir, adapter, batches, check, reference, reps)]
    runs = [] if args.tables else [(name, "onnx") for name in POLICIES] + ([("auto", "aoti")] if args.aoti else [])
    for name, target in runs:
        rows.append(
            _policy_row(name, target, model_dir, adapter, root, batches, check, reference, reps, args.max_error)
        )
    fp16_bytes = 2 * count
    for row in rows:
        row["vs_fp16"] = row["bytes"] / fp16_bytes if row["bytes"] else None
    result = {"parameters": count, "fp16_bytes": fp16_bytes, "rows": rows, "quick": args.quick}
    print(json.dumps(result, indent=2) if args.json else _text(result))


def _peft_row(model_dir, adapter, batches, check, reference, reps) -> dict:
    import peft
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(model_dir, device_map="cpu")
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        latency = timed(lambda ids: model(input_ids=ids), batches, reps)
        error = qlora.relative_error(model(input_ids=check).logits, reference)
    return {"name": "PEFT eager QLoRA", "bytes": None, "site_error": None, "error": error, "ms": latency}


def _compiled_rows(args, model_dir, adapter, root, batches, check, reference, reps) -> list[dict]:
    """PEFT's eager QLoRA and ``peftc compile`` under each ``--policies`` × ``--schemes``, every path timed
    in one interleaved loop (each repetition calls every path at batch 1 and 8 in turn)."""
    import peft
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(model_dir, device_map="cpu")
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    rows, runs = (
        [{"name": "PEFT eager QLoRA", "bytes": None, "site_error": None}],
        [lambda ids: model(input_ids=ids).logits],
    )
    for policy in args.policies.split(","):
        for tables in args.schemes.split(","):
            for absmax in args.absmax.split(","):
                with contextlib.nullcontext() if absmax == "kept" else _absmax_decoded():
                    row, run = _compiled_row(policy, tables, model_dir, adapter, root, absmax)
                rows.append(row)
                runs.append(run)
    samples = [{b: [] for b in batches} for _ in runs]
    with torch.no_grad():
        for row, run in zip(rows, runs, strict=True):
            row["error"] = qlora.relative_error(run(check), reference)
        for _ in range(reps):
            for found, run in zip(samples, runs, strict=True):
                for b, ids in batches.items():
                    start = time.perf_counter()
                    run(ids)
                    found[b].append((time.perf_counter() - start) * 1e3)
    for row, found in zip(rows, samples, strict=True):
        row["ms"] = {b: statistics.median(v) for b, v in found.items()}
    return rows


@contextlib.contextmanager
def _absmax_decoded():
    """Double-quantized NF4 layers read as before the 8-bit absmax was kept: decoded to fp32 at load."""
    from peftc.quant import loading
    from peftc.quant.modules import Bnb4Linear

    original = loading.Bnb4NestedLinear

    def decoded(packed, nested, nested_blocksize, offset, code, blocksize, quant_type, shape, bias):
        kept = original(packed, nested, nested_blocksize, offset, code, blocksize, quant_type, shape, bias)
        return Bnb4Linear(packed, kept.absmax, code, blocksize, quant_type, shape, bias)

    loading.Bnb4NestedLinear = decoded
    try:
        yield
    finally:
        loading.Bnb4NestedLinear = original


def _compiled_row(policy, tables, model_dir, adapter, root, absmax="kept") -> tuple[dict, object]:
    """``peftc compile`` (``merge_policy``, the model's plain forward, ONNX) with ``--quantize-embeddings tables``
    (``absmax``: ``fp32`` for double-quantized absmax decoded when the checkpoint is read)."""
    import peftc
    from peftc.quant.compiled import tolerances

    out = root / f"compile-{policy}-{tables}-{absmax}"
    with contextlib.redirect_stdout(io.StringIO()):
        artifact = peftc.compile(
            str(model_dir), [str(adapter)], out=out, task="none", oracle=False, quantize_embeddings=tables,
            merge_policy=policy,
        )  # fmt: skip
    runner = peftc.load(out)
    run = lambda ids: torch.as_tensor(runner(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"])  # noqa: E731
    sites = artifact.manifest.target["quantized_sites"]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    table_errors = [s["error"] for s in sites] or [0.0]
    budget = tolerances(artifact.manifest.target, {"reference": 0}).get("reference")
    name = f"compile {policy}, tables {tables}" + ("" if absmax == "kept" else ", absmax fp32")
    return {"name": name, "chosen": sorted({s["policy"] for s in sites}), "bytes": size,
            "site_error": max(table_errors), "site_error_sum": sum(table_errors),
            "budget": budget.rel if budget else None}, run  # fmt: skip


def _policy_row(name, target, model_dir, adapter, root, batches, check, reference, reps, max_error) -> dict:
    built = qlora.build(model_dir, adapter, name, max_error)
    directory = root / f"{target}-{name}"
    directory.mkdir()
    with contextlib.redirect_stdout(io.StringIO()):
        artifact = qlora.lower(built.module, target, directory)
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    run = lambda ids: artifact({"input_ids": ids, "attention_mask": torch.ones_like(ids)})  # noqa: E731
    latency = timed(run, batches, reps)
    out = run(check)
    chosen = sorted({s.policy for s in built.sites})
    layers = [m for n, m in built.module.named_modules() if ".layers." in n and isinstance(m, LINEARS)]
    layer_bytes = sum(_bytes(m) for m in layers)
    layer_fp16 = 2 * sum(m.in_features * m.out_features for m in map(_base, layers))
    return {"name": f"{target} {name}", "chosen": chosen, "bytes": size, "site_error": max(s.error for s in built.sites),
            "ms": latency, "error": qlora.relative_error(out, reference), "linears_vs_fp16": layer_bytes / layer_fp16 if target == "onnx" else None}  # fmt: skip


def _base(module):
    return getattr(module, "base", module)


def _bytes(module) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    return module.stored_bytes()


def _text(result: dict) -> str:
    lines = [f"{result['parameters'] / 1e6:.1f}M parameters; fp16 artifact {result['fp16_bytes'] / 1e6:.1f} MB"]
    lines.append(
        f"{'':<32}{'MB':>8}{'×fp16':>7}{'b1 ms':>9}{'b8 ms':>9}{'site err':>10}{'output err':>12}{'lin×fp16':>10}"
        f"{'budget':>10}  chosen"
    )
    for r in result["rows"]:
        mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        ratio = f"{r['vs_fp16']:.2f}" if r["vs_fp16"] else "-"
        site = f"{r['site_error']:.2g}" if r["site_error"] is not None else "-"
        linears = f"{r['linears_vs_fp16']:.2f}" if "linears_vs_fp16" in r else "-"
        budget = f"{r['budget']:.2g}" if r.get("budget") else "-"
        lines.append(
            f"{r['name']:<32}{mb:>8}{ratio:>7}{r['ms'][1]:>9.1f}{r['ms'][8]:>9.1f}{site:>10}{r['error']:>12.2g}"
            f"{linears:>10}{budget:>10}  " + ",".join(r.get("chosen", []))
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
