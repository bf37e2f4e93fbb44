"""``peftc qlora MODEL --adapter DIR -o OUT``: a LoRA adapter on a bitsandbytes base, merged per site.

Each adapted site takes ``--merge-policy`` (``auto``: the smallest artifact whose added error is within
``--max-error``, ``peftc/quant/policy.py``); the model is lowered by ``--target`` (``onnx``: NF4/FP4 as
``com.microsoft.MatMulBnb4``; ``aoti``: dequantization in the graph, folded at compile time) and the
artifact is checked against peftc's eager model (the compile error), and peftc's eager model is compared
with PEFT's own QLoRA model where bitsandbytes is installed (the policy's error plus bitsandbytes' CPU
kernel rounding), each reported on its own.
``OUT/qlora.json`` records per site the policy, the error it adds and its bytes; ``peftc inspect OUT``
prints that table.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from peftc.errors import InputError, VerificationError

RECORD = "qlora.json"
COMPILE_BUDGET = 1e-4
"""fp32 artifact against fp32 eager: the same products summed in another order (measured ≤ 1e-6)."""
POLICIES = ("auto", "float", "requant", "two-path")
"""``peftc.quant.policy.POLICIES``, spelled out so that building the parser imports no torch."""


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the ``qlora`` command on the CLI's subparsers."""
    q = sub.add_parser("qlora", help="compile a LoRA adapter on a bitsandbytes-quantized model, merged per site")
    q.add_argument("model", help="a Hugging Face directory whose config.json has a quantization_config")
    q.add_argument("--adapter", required=True, help="a PEFT LoRA adapter directory")
    q.add_argument("-o", "--out", required=True, type=Path)
    q.add_argument("--target", choices=("onnx", "aoti"), default="onnx")
    q.add_argument("--merge-policy", choices=POLICIES, default="auto")
    q.add_argument("--max-error", type=float, help="auto's per-site error budget (default 1e-2)")
    q.add_argument("--no-oracle", action="store_true", help="skip the comparison against PEFT's eager QLoRA model")
    q.add_argument("--force", action="store_true", help="replace OUT")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build, lower, check and record; print the per-site table."""
    import torch

    from peftc.quant import policy, qlora

    out: Path = args.out
    if out.exists() and not args.force:
        raise InputError(f"{out}: exists; pass --force to replace it")
    if args.max_error is not None and not args.max_error > 0:
        raise InputError(f"--max-error {args.max_error!r}: give a positive relative error")
    built = qlora.build(args.model, args.adapter, args.merge_policy, args.max_error)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    artifact = qlora.lower(built.module, args.target, out)
    ids = torch.randint(0, built.module.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = built.module(**feeds).logits
    compile_error = qlora.relative_error(artifact(feeds), expected)
    bitsandbytes = (qlora.quant_method(args.model) or "bitsandbytes") == "bitsandbytes"
    run_oracle = not args.no_oracle and bitsandbytes
    oracle_error = _oracle_error(args.model, args.adapter, feeds, expected) if run_oracle else None
    record = {
        "model": str(args.model), "adapter": str(args.adapter), "target": args.target,
        "merge_policy": args.merge_policy, "max_error": args.max_error, "compile_error": compile_error,
        "peft_qlora_error": oracle_error,
        "files": {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()},
        "sites": [c.row() for c in built.sites],
    }  # fmt: skip
    (out / RECORD).write_text(json.dumps(record, indent=2))
    print(policy.table(built.sites))
    print(f"compile error (artifact vs peftc eager): {compile_error:.2g}")
    if oracle_error is not None:
        print(f"policy + bitsandbytes kernel error (peftc eager vs PEFT eager QLoRA): {oracle_error:.2g}")
    elif not bitsandbytes:
        print("PEFT eager QLoRA: not run (transformers loads GPTQ/AWQ only through optimum/gptqmodel kernels)")
    if compile_error > COMPILE_BUDGET:
        raise VerificationError(f"{out}: the artifact differs from the eager model by {compile_error:.2g}")
    return 0


def _oracle_error(model: str, adapter: str, feeds, expected) -> float | None:
    """peftc's eager model against PEFT's own QLoRA model on bitsandbytes' CPU kernels (None when
    bitsandbytes or PEFT is not installed): the policy's error plus those kernels' rounding."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("peft") is None:
        return None
    import peft
    import torch
    import transformers

    from peftc.quant.qlora import relative_error

    base = transformers.AutoModelForCausalLM.from_pretrained(model, device_map="cpu")
    oracle = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return relative_error(oracle(**feeds).logits, expected)


def show(directory: str | Path) -> bool:
    """Print the per-site table of a ``peftc qlora`` output; False when ``directory`` is not one."""
    path = Path(directory) / RECORD
    if not path.is_file():
        return False
    from peftc import reading
    from peftc.quant.policy import SiteChoice, table

    record = json.loads(reading.read_bytes(path))
    print(f"qlora artifact: {record['model']} + {record['adapter']} -> {record['target']}")
    print(table([SiteChoice(**row) for row in record["sites"]]))
    print(f"compile error: {record['compile_error']:.2g}; files: {record['files']}")
    return True
