"""The ``peftc combine`` command's flags and rendering (the work is in ``peftc.combine.run``)."""

from __future__ import annotations

import argparse
import json

from peftc.combine.options import CONVENTIONS, METHODS


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the ``combine`` command on the CLI's subparsers."""
    c = sub.add_parser(
        "combine", help="combine several adapters of one base into one adapter (task arithmetic, TIES, DARE…)"
    )
    c.add_argument("model", help="the base model the adapters were trained on (as for compile)")
    c.add_argument("--adapter", action="append", required=True, help="adapter directory or file (repeatable, in order)")
    c.add_argument(
        "--config", action="append", help="adapter_config.json for an adapter given as a bare .safetensors file"
    )
    c.add_argument("--method", required=True, choices=METHODS, help="how to combine (README: Combining adapters)")
    c.add_argument("--weights", help="one weight per adapter, comma-separated (default 1 each; negative negates)")
    c.add_argument("--density", type=float, help="fraction of each task vector kept by the trimming methods")
    c.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    c.add_argument(
        "--convention",
        choices=CONVENTIONS,
        default="paper",
        help="sign election, normalisation and DARE rescale where references disagree (default paper)",
    )
    c.add_argument("--scale", type=float, default=1.0, help="λ: multiply the combined task vector (default 1)")
    c.add_argument("--rank", type=int, help="svd: rank kept (default: the largest input rank)")
    c.add_argument("--gamma", type=float, default=0.01, help="breadcrumbs: fraction of outliers dropped (0.01)")
    c.add_argument("--alpha", type=float, help="lines: first-block scale (default 1/T); opcm: subspace mass (0.5)")
    c.add_argument("--beta", type=float, help="lines: scale added at the last block (default 1 - alpha)")
    c.add_argument("--order", help="opcm: the order adapters arrive in, 0-based indices, comma-separated")
    c.add_argument("--allow-pickle", action="store_true", help="accept pickled adapter weights (weights_only=True)")
    c.add_argument("-o", "--out", required=True, help="adapter directory to create")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run)


def add_compile_flag(c: argparse.ArgumentParser) -> None:
    """``peftc compile --combine M[:k=v,…]``."""
    c.add_argument(
        "--combine",
        metavar="METHOD[:K=V,...]",
        help="combine the --adapter arguments into one first (peftc combine's methods; weights=1/0.5, order=1/0)",
    )


def _numbers(flag: str, text: str | None, kind: type) -> tuple | None:
    from peftc.errors import InputError

    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise InputError(f"{flag} {text!r}: give comma-separated numbers") from e


def run(args: argparse.Namespace) -> int:
    """Combine, print the report (table or JSON)."""
    from peftc.combine.options import CombineOptions
    from peftc.combine.report import table
    from peftc.combine.run import combine

    options = CombineOptions(
        method=args.method,
        weights=_numbers("--weights", args.weights, float),
        density=args.density,
        seed=args.seed,
        convention=args.convention,
        scale=args.scale,
        rank=args.rank,
        gamma=args.gamma,
        alpha=args.alpha,
        beta=args.beta,
        order=_numbers("--order", args.order, int),
    )
    report = combine(
        args.model,
        args.adapter,
        options,
        args.out,
        configs=args.config or (),
        allow_pickle=args.allow_pickle,
        progress=args.progress,
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else table(report), end="\n" if args.json else "")
    return 0
