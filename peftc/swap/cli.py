"""``peftc compile``'s flags of swappable artifacts (``--swappable`` and what it takes), declared without
importing torch."""

from __future__ import annotations

import argparse

from peftc.swap.storage import SLOT_DTYPES


def add_compile_flags(c: argparse.ArgumentParser) -> None:
    """``--swappable``, ``--max-rank``, ``--multi-adapter``, ``--slot-capacity`` and ``--slot-dtype``."""
    c.add_argument(
        "--swappable",
        action="store_true",
        help="keep LoRA, S²FT and sparse-ΔW sites as fixed-shape adapter slots, so adapters are added and switched "
        "without recompiling "
        "(the --adapter arguments are then alternatives, not a stack)",
    )
    c.add_argument("--max-rank", type=int, help="slot rank of a --swappable artifact (default: the largest given rank)")
    c.add_argument(
        "--multi-adapter",
        type=int,
        default=0,
        metavar="N",
        help="with --swappable: let one call mix up to N adapters, one per batch row",
    )
    c.add_argument(
        "--slot-capacity",
        type=int,
        metavar="K",
        help="with --swappable: rows/columns (entries) per S²FT (sparse ΔW) slot",
    )
    c.add_argument(
        "--slot-dtype",
        default="fp32",
        metavar="|".join(SLOT_DTYPES),  # not choices: CompileOptions refuses a bad value in one line
        help="with --swappable: how adapter files store slot values: fp32 (default), fp16, or int8 with one scale per "
        "row; each adapter is verified within the format's error budget (add-adapter uses the artifact's)",
    )
