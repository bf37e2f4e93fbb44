"""What a combination reports: per tensor the fraction trimmed, the sign conflicts resolved, the norm of
the result against the inputs' (and the truncation error and rank of a low-rank result); rendered as
a table or JSON by the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Row:
    """One combined tensor."""

    key: str
    trimmed: float
    """Fraction of the inputs' non-zero entries dropped by trimming (mean over adapters)."""
    conflicts: int
    """Entries where a task vector disagreed with the elected sign (ties, dare-ties)."""
    norm: float
    """‖τ‖_F of the combined task vector (after λ; of ``B·A`` for a low-rank result)."""
    input_norms: tuple[float, ...]
    """‖τ_i‖_F of each input."""
    rank: int | None = None
    """Rank of a low-rank result."""
    error: float | None = None
    """svd: ‖ΔW − B·A‖_F / ‖ΔW‖_F (the truncation error); cat: 0."""


@dataclasses.dataclass(frozen=True)
class CombineReport:
    """The outcome of one combination."""

    out: str
    format: str
    """``lora`` (a PEFT LoRA directory) or ``delta`` (peftc's full-ΔW adapter)."""
    why: str
    """Why that format."""
    method: str
    params: dict[str, Any]
    inputs: tuple[dict[str, Any], ...]
    """Each input adapter: name, path, method, sha256 of its config and weights."""
    rows: tuple[Row, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``peftc combine --json``, ``combine.json``)."""
        return {
            "out": self.out,
            "format": self.format,
            "why": self.why,
            "method": self.method,
            "params": self.params,
            "inputs": list(self.inputs),
            "tensors": [dataclasses.asdict(r) | {"input_norms": list(r.input_norms)} for r in self.rows],
            "seconds": round(self.seconds, 3),
        }


def table(report: CombineReport) -> str:
    """The per-tensor table and a summary line."""
    names = [str(i["name"]) for i in report.inputs]
    head = ["tensor", "trimmed", "conflicts", "‖τ‖", *(f"‖{n}‖" for n in names)]
    low_rank = any(r.rank is not None for r in report.rows)
    if low_rank:
        head += ["rank", "error"]
    lines = [head]
    for row in report.rows:
        cells = [row.key, f"{row.trimmed:.1%}", str(row.conflicts), _num(row.norm), *map(_num, row.input_norms)]
        if low_rank:
            cells += [str(row.rank) if row.rank is not None else "-", _num(row.error) if row.error is not None else "-"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
    return f"{text}\n{_summary(report)}\n"


def _summary(report: CombineReport) -> str:
    conflicts = sum(r.conflicts for r in report.rows)
    trimmed = _mean([r.trimmed for r in report.rows])
    return (
        f"{report.method}: {len(report.inputs)} adapter(s), {len(report.rows)} tensor(s), mean trimmed {trimmed:.1%}, "
        f"{conflicts} sign conflict(s) resolved; wrote a {report.format} adapter to {report.out} ({report.why}) "
        f"in {report.seconds:.2f} s"
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _num(value: float) -> str:
    return f"{value:.4g}"
