"""The ``peftc analyze`` command's flags and rendering (the work is in ``peftc.density.analyze``)."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftc.errors import InputError
from peftc.report import load_pyplot

PLOTS = "plots.json"
"""The list of PNGs ``analyze --plot`` wrote, which marks its directory as replaceable by the next one."""


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the ``analyze`` command on the CLI's subparsers."""
    a = sub.add_parser("analyze", help="measure a model's MLP activation density (DEFT) and exploit it in eager")
    a.add_argument("model", help="the base model (as for compile)")
    a.add_argument("--adapter", action="append", default=[], help="adapter to merge first (repeatable, in order)")
    a.add_argument("--density", action="store_true", help="measure MLP activation density (the analysis peftc has)")
    a.add_argument("--calibration", metavar="FILE", help=".safetensors or .npz: one array per model input, batch first")
    a.add_argument("--samples", type=int, default=16, help="without --calibration: seeded batches to generate (16)")
    a.add_argument("--held-out", type=int, default=4, help="generated held-out batches the passes are checked on (4)")
    a.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default 0)")
    a.add_argument(
        "--threshold", type=float, default=1e-2, help="|a| at or below it is inactive for density_above_threshold"
    )
    a.add_argument("--prune-dead-neurons", action="store_true", help="slice never-active neurons out of the MLPs")
    a.add_argument("--skip-blocks", action="store_true", help="replace MLP blocks by their bias within the budget")
    a.add_argument("--sparse-mlp", action="store_true", help="gather-GEMM down projections where it is faster here")
    a.add_argument("--max-error", type=float, default=1e-5, help="the passes' budget on the outputs (default 1e-5)")
    a.add_argument("--input", action="append", default=[], help="input description, as for compile")
    a.add_argument("--allow-pickle", action="store_true", help="accept pickled weight files (weights_only=True)")
    a.add_argument("--plot", metavar="DIR", help="write one PNG of per-neuron activation frequency per layer")
    a.add_argument("--json", action="store_true", help="print the report as one JSON object")
    a.set_defaults(func=run)


def add_compile_flags(c: argparse.ArgumentParser) -> None:
    """``peftc compile``'s density passes (``peftc/density/compiled.py``; ``--max-error`` is their budget)."""
    c.add_argument(
        "--prune-dead-neurons",
        action="store_true",
        help="slice MLP neurons never active on the calibration inputs out of the merged weights (ReLU models)",
    )
    c.add_argument(
        "--skip-blocks", action="store_true", help="replace MLP blocks by their bias where the error stays in budget"
    )
    c.add_argument("--sparse-mlp", action="store_true", help="refused by compile (data-dependent); see peftc analyze")
    c.add_argument(
        "--dead-threshold",
        type=float,
        metavar="TAU",
        help="GELU/SiLU: a neuron whose MLP value |h| <= TAU on every calibration row is dead, its mean folded into "
        "the down bias (default 0.01; ReLU: exact zeros)",
    )


def compile_options(args: argparse.Namespace) -> dict[str, Any]:
    """``CompileOptions``' density fields from ``peftc compile``'s flags: the passes asked for, the threshold."""
    return {"density": _passes(args), "dead_threshold": args.dead_threshold}


def _passes(args: argparse.Namespace) -> tuple[str, ...]:
    """The density passes the flags of ``compile`` or ``analyze`` ask for."""
    return tuple(
        name for name, flag in (("prune-dead-neurons", args.prune_dead_neurons), ("skip-blocks", args.skip_blocks),
                                ("sparse-mlp", args.sparse_mlp)) if flag
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Analyze, print the table or JSON, draw the plots."""
    from peftc.density.analyze import Request, analyze

    if not args.density:
        raise InputError("peftc analyze: give --density (activation density is the analysis peftc has)")
    passes = _passes(args)
    request = Request(
        model=args.model, adapters=tuple(args.adapter), calibration=Path(args.calibration) if args.calibration else None,
        samples=args.samples, held_out=args.held_out, seed=args.seed, threshold=args.threshold, passes=passes,
        max_error=args.max_error, inputs=tuple(args.input), allow_pickle=args.allow_pickle,
    )  # fmt: skip
    output = _plot_dir(Path(args.plot), request) if args.plot else None  # checked before any work
    try:
        report, _ = analyze(request)
        if output is not None:
            plot(report, output.tmp)
            output.commit()
    finally:
        if output is not None:
            output.abort()
    print(json.dumps(report, indent=1) if args.json else text(report))
    return 0


def text(report: Mapping[str, Any]) -> str:
    """The report for people: one row per layer, then one per pass and block."""
    from peftc.report import table

    rows = [
        [layer["name"], layer["activation"], layer["neurons"], f"{layer['density']:.4f}",
         f"{layer['density_above_threshold']:.4f}", layer["dead_neurons"], layer["rare_neurons"]]
        for layer in report["layers"]
    ]  # fmt: skip
    headers = ["layer", "act", "neurons", "density", f"|a|>{report['threshold']:g}", "dead", "never>thr"]
    lines = [
        table(headers, rows),
        (
            f"density {report['density']:.4f} over {report['neurons']} neurons, {report['dead_neurons']} dead "
            f"(calibration: {_source(report['calibration'])})"
        ),
    ]
    if "exploit" in report:
        done = report["exploit"]
        rows = [
            [b["name"], b["pass"], "kept" if b["kept"] else "dense", _detail(b),
             _number(b.get("block_error")), _number(b.get("error"))]
            for b in done["blocks"]
        ]  # fmt: skip
        lines += [
            table(["layer", "pass", "result", "detail", "block error", "model error"], rows),
            (
                f"model error {done['error']:.3g} (budget {done['max_error']:g}) on {done['held_out_batches']} held-out "
                "batches"
            ),
        ]
    return "\n".join(lines)


def _source(record: Mapping[str, Any]) -> str:
    if record["source"] == "generated":
        return f"{record['batches']} generated batches, seed {record['seed']}"
    return f"{record['source']}, {record['rows']} rows"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _detail(record: Mapping[str, Any]) -> str:
    if "why" in record:
        return record["why"]
    if record["pass"] == "prune-dead-neurons":
        return f"{record['removed']}/{record['neurons']} removed"
    if record["pass"] == "skip-blocks":
        return f"contribution {record['contribution']:.3g}"
    return f"dense {record['dense_ms']:.3f} ms, gather {record['sparse_ms']:.3f} ms"


def _plot_dir(directory: Path, request: Any) -> Any:
    """``--plot DIR``: a new or empty directory, or one an earlier ``--plot`` wrote (replaced whole)."""
    from peftc.artifact.output import OutputDir

    load_pyplot()  # refuses before the analysis runs when matplotlib is missing
    read = (request.model, *request.adapters, request.calibration)
    given = [Path(p) for p in read if isinstance(p, (str, os.PathLike)) and os.path.lexists(p)]
    return OutputDir(directory, flag="--plot", command="analyze", force=True, ours=_plotted, inputs=given)


def _plotted(directory: Path) -> bool:
    """``directory`` holds only what :func:`plot` writes: its PNGs and :data:`PLOTS`, which lists them."""
    try:
        listed = set(json.loads((directory / PLOTS).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p.name in listed | {PLOTS} and p.is_file() and not p.is_symlink() for p in directory.iterdir())


def plot(report: Mapping[str, Any], directory: Path) -> list[Path]:
    """One PNG per layer in ``directory``: each neuron's activation frequency, sorted, and :data:`PLOTS`
    listing them.

    Raises:
        UnsupportedError: matplotlib is not installed.
    """
    pyplot = load_pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for layer in report["layers"]:
        figure, axes = pyplot.subplots(figsize=(6, 3.5))
        axes.plot(sorted(layer["frequency"], reverse=True))
        axes.set_xlabel("neuron (sorted by frequency)")
        axes.set_ylabel("fraction of rows non-zero")
        axes.set_ylim(0, 1)
        axes.set_title(f"{layer['name']}: density {layer['density']:.3f}, {layer['dead_neurons']} dead", fontsize=8)
        figure.tight_layout()
        path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', layer['name'])}.png"
        figure.savefig(path, dpi=80)
        pyplot.close(figure)
        written.append(path)
    (directory / PLOTS).write_text(json.dumps({"files": [p.name for p in written]}, indent=1) + "\n")
    return written
