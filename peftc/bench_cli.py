"""``peftc bench``: time artifacts against eager PyTorch and PEFT (the work is in ``peftc.bench``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

PLOT_FORMATS = (".png", ".svg", ".pdf")
"""The image formats ``--plot`` writes (matplotlib picks the format from the suffix)."""


def register(sub: argparse._SubParsersAction) -> None:
    """Declare ``peftc bench`` on the ``peftc`` subcommand parser ``sub``."""
    b = sub.add_parser(
        "bench", help="time artifacts against eager PyTorch and PEFT on this machine, with their errors and sizes"
    )
    b.add_argument("artifacts", nargs="+", metavar="OUT")
    b.add_argument("--model", help="the base model, if not the one recorded in the first artifact's manifest")
    b.add_argument("--batch", default="1,8", help="batch sizes to time, comma-separated (default 1,8)")
    b.add_argument(
        "--size", action="append", default=[], metavar="DIM=N", help="size of another dynamic dim, e.g. seq=128"
    )
    b.add_argument("--reps", type=int, default=10, help="interleaved repetitions per batch size (default 10)")
    b.add_argument("--plot", metavar="FILE.png", help="also draw latency against error (needs matplotlib)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from peftc import bench
    from peftc.errors import InputError

    def numbers(flag: str, texts: Sequence[str]) -> list[tuple[str, int]]:
        out = []
        for text in texts:
            name, _, value = text.rpartition("=")
            if not value.isdigit() or int(value) < 1:
                raise InputError(f"{flag} {text!r}: give positive integers ({'DIM=N' if flag == '--size' else '1,8'})")
            out.append((name, int(value)))
        return out

    batches = [n for _, n in numbers("--batch", [t for t in args.batch.split(",") if t.strip()])]
    sizes = dict(numbers("--size", args.size))
    if "" in sizes:
        raise InputError("--size: give DIM=N with the dim's name (e.g. seq=128)")
    if args.reps < 1:
        raise InputError(f"--reps {args.reps}: give a positive count")
    if args.plot and (Path(args.plot).suffix.lower() not in PLOT_FORMATS or Path(args.plot).is_dir()):
        raise InputError(f"--plot {args.plot}: give a file name ending in {', '.join(PLOT_FORMATS)}")
    result = bench.bench(
        [Path(p) for p in args.artifacts], batches=batches, sizes=sizes, reps=args.reps, progress=args.progress
    )
    if args.plot:
        bench.plot(result, Path(args.plot))
    print(json.dumps(result, indent=2) if args.json else bench.report(result), end="\n" if args.json else "")
    return 0
