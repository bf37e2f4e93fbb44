"""The pass contract and the pass manager.

A pass is a small object with a kebab-case ``name``, frozen options, and three methods:

* ``requires(program)``: raise :class:`PreconditionError` (naming the site) if the pass cannot run;
* ``run(program, ctx) -> PassResult``: build and return a *new* program (through
  :class:`~peftc.ir.ProgramEditor`); never mutate the one handed in;
* ``ensures(program, result)``: raise :class:`PostconditionError` if the result breaks the pass's promise.

:class:`PassManager` enforces what a pass claims. With ``ctx.check_invariants`` (on by default) it
fingerprints the input before and after ``run`` — a pass that mutated its input fails — and compares
input and output fingerprints against ``result.modified`` — a pass that lies about ``modified``
fails. It then runs the IR invariants (``peftc/passes/README.md``), times the pass, records
node-count deltas, writes ``--dump-ir`` files, and re-raises any failure naming the pass and the
passes that ran before it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from peftc import ir
from peftc.errors import (
    InputError,
    PassError,
    PeftcError,
    PostconditionError,
    PreconditionError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """Something a pass wants a person to know about one site (or the whole program)."""

    site: str
    message: str
    kind: str = "skipped"
    """``skipped`` (the pass left the site alone, ``message`` says why), ``warning`` or ``info``."""


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new program, whether it differs, counts and diagnostics."""

    program: ir.Program
    modified: bool
    stats: Mapping[str, int] = dataclasses.field(default_factory=dict)
    diagnostics: tuple[Diagnostic, ...] = ()


@dataclasses.dataclass
class PassContext:
    """Run-wide settings handed to every pass; passes read it, never write it."""

    check_invariants: bool = True
    dump_dir: Path | None = None
    progress: ProgressFn = lambda message: None


class Pass(Protocol):
    """A program-to-program rewrite; see the module docstring for the contract."""

    name: ClassVar[str]

    def requires(self, program: ir.Program) -> None: ...

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult: ...

    def ensures(self, program: ir.Program, result: PassResult) -> None: ...

    def describe(self) -> Mapping[str, Any]: ...


class PassBase:
    """Default ``requires``/``ensures`` (nothing to check) and ``describe`` (the options dataclass)."""

    name: ClassVar[str] = ""
    options: Any = None

    def requires(self, program: ir.Program) -> None:
        return None

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        return None

    def describe(self) -> Mapping[str, Any]:
        if self.options is None or not dataclasses.is_dataclass(self.options):
            return {}
        return {f.name: _describe_value(getattr(self.options, f.name)) for f in dataclasses.fields(self.options)}


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One pass as it ran, for reports and the manifest."""

    name: str
    options: Mapping[str, Any]
    modified: bool
    stats: Mapping[str, int]
    diagnostics: tuple[Diagnostic, ...]
    seconds: float
    nodes_before: int
    nodes_after: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": dict(self.options),
            "modified": self.modified,
            "stats": dict(self.stats),
            "diagnostics": [dataclasses.asdict(d) for d in self.diagnostics],
            "seconds": round(self.seconds, 4),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


class PassManager:
    """Runs passes in order under the contract; see the module docstring."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def run(
        self, program: ir.Program, ctx: PassContext, *, history: Sequence[str] = ()
    ) -> tuple[ir.Program, list[PassRecord]]:
        """Run every pass; return the final program and one record per pass.

        ``history`` names passes that ran earlier (in another manager), for error messages.
        """
        records: list[PassRecord] = []
        ran = list(history)
        if ctx.dump_dir is not None and not ran:
            _dump(ctx.dump_dir, 0, "input", program)
        for p in self.passes:
            ctx.progress(f"pass {p.name}")
            start = time.perf_counter()
            try:
                result = self._run_one(p, program, ctx)
            except (InputError, UnsupportedError):
                raise
            except PeftcError as e:
                raise type(e)(f"{p.name} failed after [{', '.join(ran)}]: {e}") from e
            except Exception as e:
                raise PassError(f"{p.name} failed after [{', '.join(ran)}]: {type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - start
            records.append(
                PassRecord(
                    name=p.name,
                    options=p.describe(),
                    modified=result.modified,
                    stats=dict(result.stats),
                    diagnostics=tuple(result.diagnostics),
                    seconds=seconds,
                    nodes_before=len(program.graph.nodes),
                    nodes_after=len(result.program.graph.nodes),
                )
            )
            log.info("%s: %s in %.2fs", p.name, dict(result.stats), seconds)
            ran.append(p.name)
            program = result.program
            if ctx.dump_dir is not None:
                _dump(ctx.dump_dir, len(ran), p.name, program)
        return program, records

    @staticmethod
    def _run_one(p: Pass, program: ir.Program, ctx: PassContext) -> PassResult:
        try:
            p.requires(program)
        except PeftcError:
            raise
        except Exception as e:
            raise PreconditionError(f"requires: {e}") from e
        before = ir.fingerprint(program) if ctx.check_invariants else ""
        result = p.run(program, ctx)
        if ctx.check_invariants:
            if ir.fingerprint(program) != before:
                raise PassError("the pass mutated the program it was given (passes must be functional)")
            changed = ir.fingerprint(result.program) != before
            if changed != result.modified:
                raise PassError(
                    f"the pass reported modified={result.modified} but the program "
                    f"{'changed' if changed else 'did not change'}"
                )
        try:
            p.ensures(result.program, result)
            if ctx.check_invariants:
                ir.validate(result.program)
        except PeftcError:
            raise
        except Exception as e:
            raise PostconditionError(f"ensures: {type(e).__name__}: {e}") from e
        return result


def _dump(directory: Path, index: int, name: str, program: ir.Program) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{index:02d}_{name}.txt").write_text(ir.text(program))


def _describe_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe_value(v) for v in value]
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else type(value).__name__


def fresh_name(editor: ir.ProgramEditor, fqn: str) -> str:
    """``fqn``, or ``fqn2``, ``fqn3``, …: the first that names no state (nor state-dict key) of the program."""
    candidate, index = fqn, 1
    while editor.has_state(candidate) or candidate in editor.state_dict:
        index += 1
        candidate = f"{fqn}{index}"
    return candidate
