"""``peftc compile``'s QLoRA flags, and ``peftc qlora``: an alias of ``peftc compile`` for a LoRA on a
quantized base.

``peftc compile QBASE --adapter LORA -o OUT --merge-policy auto|auto-speed|float|requant|requant-int8|two-path|two-path-fp16
--max-error E``
reads the LoRA as call sites on the packed layers (``peftc/quant/sites.py``), folds or keeps each one by
the policy (``peftc/quant/merge.py``), lowers and verifies the artifact like any other (against the
unmerged reference program and PEFT's own QLoRA model, ``peftc/quant/compiled.py`` gives the budgets),
and records the per-site table in the manifest (``target.quantized_sites``, shown by ``peftc inspect``).
``peftc qlora`` takes the same arguments and runs exactly that compile.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MERGE_POLICIES = ("auto", "auto-speed", "float", "requant", "requant-int8", "two-path", "two-path-fp16")
"""``peftc.quant.policy.POLICIES``, spelled out so that building the parser imports no torch."""
EMBEDDINGS = ("none", "int8", "int4", "int8-head")


def add_compile_flags(c: argparse.ArgumentParser) -> None:
    """``peftc compile --merge-policy``."""
    c.add_argument(
        "--merge-policy",
        choices=MERGE_POLICIES,
        default="auto",
        help="LoRA on a quantized base: per site, float (merge, fp32 weight), requant (merge, quantize again), "
        "requant-int8 (NF4/FP4: merge, 8-bit MatMulNBits blocks, int8 compute), two-path (packed GEMM + LoRA "
        "branch), two-path-fp16 (the same, factors stored fp16), auto (the smallest whose added error is within "
        "--max-error, default 1e-2) or auto-speed (the fastest within it)",
    )
    c.add_argument(
        "--quantize-embeddings",
        choices=EMBEDDINGS,
        default="none",
        help="a quantized base's float embedding and LM head: int8 (per row), int4 (head NF4, embedding int8), "
        "int8-head (head int8, embedding fp16) or "
        "none (float, as PEFT's QLoRA keeps them; default); the error each adds is recorded like a site's",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the ``qlora`` command (an alias of ``peftc compile``) on the CLI's subparsers."""
    q = sub.add_parser("qlora", help="alias of `peftc compile` for a LoRA adapter on a quantized base")
    q.add_argument("model", help="a Hugging Face directory whose config.json has a quantization_config")
    q.add_argument("--adapter", required=True, help="a PEFT LoRA adapter directory")
    q.add_argument("-o", "--out", required=True, type=Path)
    q.add_argument("--target", choices=("onnx", "aoti"), default="onnx")
    add_compile_flags(q)
    q.add_argument("--max-error", type=float, help="auto's per-site error budget (default 1e-2)")
    q.add_argument("--no-oracle", action="store_true", help="skip the comparison against PEFT's eager QLoRA model")
    q.add_argument("--force", action="store_true", help="replace OUT")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``peftc compile MODEL --adapter DIR -o OUT`` with the same flags; prints the per-site table."""
    from peftc.driver.pipeline import compile_artifact
    from peftc.options import CompileOptions
    from peftc.quant.compiled import table
    from peftc.report import verification_table

    options = CompileOptions(
        model=args.model, adapters=(args.adapter,), out=args.out, target=args.target, force=args.force,
        oracle=not args.no_oracle, max_error=args.max_error, merge_policy=args.merge_policy,
        quantize_embeddings=args.quantize_embeddings,
    )  # fmt: skip
    artifact = compile_artifact(options, args.progress)
    print(table(artifact.manifest.target.get("quantized_sites") or []))
    print(verification_table(artifact.manifest.verification))
    return 0
