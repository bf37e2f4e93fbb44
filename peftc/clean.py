"""``peftc clean DIR_OR_OUTPUT``: remove the temporary directories that killed runs left behind.

Only peftc's own marked temporary directories whose run has ended are removed
(``peftc.artifact.temp`` says how they are recognised); nothing else is touched.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the ``clean`` command on the CLI's subparsers."""
    c = sub.add_parser(
        "clean", help="remove temporary directories left beside an output (or inside a directory) by killed runs"
    )
    c.add_argument("path", metavar="DIR_OR_OUTPUT", help="an output given as -o, or a directory to clean inside")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Remove the stale temporary directories and print each one removed."""
    from peftc.artifact.temp import clean

    removed = clean(args.path)
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"nothing to clean at {args.path}")
    return 0
