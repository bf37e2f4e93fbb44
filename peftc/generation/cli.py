"""``peftc generate OUT --prompt TEXT``: text in, text out, with the artifact's own tokenizer files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftc.errors import InputError, first_line


def register(sub: Any) -> None:
    """Add the ``generate`` command to the subparsers ``sub``."""
    g = sub.add_parser("generate", help="generate text with a --task text-generation or text2text-generation artifact")
    g.add_argument("artifact")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch row each)")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    g.add_argument("--adapter", help="adapter of a --swappable artifact")
    g.add_argument("--json", action="store_true", help="print {prompt, text, tokens, full_text} per prompt as JSON")
    g.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from peftc.generation.files import has_tokenizer
    from peftc.loaders.causal import key_name
    from peftc.runtime import load

    runner = load(args.artifact)
    directory = Path(args.artifact)
    if "generation" not in runner.manifest.target and key_name(0) not in runner.input_names:
        raise InputError(
            f"{directory}: not a generation artifact (compile with --task text-generation or text2text-generation)"
        )
    if not has_tokenizer(directory):
        raise InputError(f"{directory}: no tokenizer files in the artifact (its model directory had none)")
    tokenizer = _tokenizer(directory)
    encoded = tokenizer(list(args.prompt), return_tensors="np", padding=True)
    empty = [p for p, m in zip(args.prompt, encoded["attention_mask"], strict=True) if not m.any()]
    if empty or not encoded["input_ids"].shape[1]:
        raise InputError(f"--prompt {(empty or [''])[0]!r}: the tokenizer makes no tokens of it; give some text")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"adapter": args.adapter} if args.adapter is not None else {}
    tokens = runner.generate(
        encoded["input_ids"],
        encoded["attention_mask"],
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        **options,
    )
    seq2seq = "generation" in runner.manifest.target  # decoder tokens: the start token, then new ones
    start = 1 if seq2seq else encoded["input_ids"].shape[1]
    rows = []
    for prompt, row, mask in zip(args.prompt, tokens, encoded["attention_mask"], strict=True):
        new = [int(t) for t in row[start:]]
        kept = new if seq2seq else [int(t) for t, m in zip(row, [*mask, *[1] * len(new)], strict=True) if m]
        rows.append({
            "prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new,
            "full_text": tokenizer.decode(kept, skip_special_tokens=True),
        })  # fmt: skip
    print(json.dumps(rows, indent=2) if args.json else "\n".join(row["full_text"] for row in rows))
    return 0


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise InputError(f"{directory}: transformers cannot load the tokenizer ({first_line(e)})") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise InputError(f"{directory}: the tokenizer has no pad or eos token to pad prompts with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
