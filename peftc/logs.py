"""Log noise from third-party imports that peftc keeps off its users' terminals."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NOISY = ("torchao", "torch.utils._pytree")
"""torchao (imported by transformers and peft too, where installed) warns at import for each CUDA
extension a CPU build cannot load, and registers enums that torch's pytree warns about."""


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers (``""``: the root logger) to ERROR for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def quiet_imports() -> contextlib.AbstractContextManager[None]:
    """The :data:`NOISY` loggers quiet for the duration."""
    return quiet(*NOISY)


class Hidden:
    """Warnings from dependencies kept off the terminal during a command, counted by package."""

    def __init__(self) -> None:
        self.sources: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.sources.values())

    def summary(self) -> str:
        parts = ", ".join(f"{name} {n}" for name, n in self.sources.most_common())
        return f"hid {self.count} warning(s) from dependencies ({parts}); --debug shows them"


class _Counting(logging.Handler):
    def __init__(self, hidden: Hidden) -> None:
        super().__init__(logging.WARNING)
        self.hidden = hidden

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("peftc"):
            self.hidden.sources[record.name.split(".")[0]] += 1


@contextlib.contextmanager
def hidden_warnings(enabled: bool = True) -> Iterator[Hidden]:
    """Within the block, Python warnings (once per place, as Python's default shows them) and
    third-party log records at WARNING or above are counted instead of printed; ``enabled=False``
    leaves them alone (``--debug``)."""
    hidden = Hidden()
    if not enabled:
        yield hidden
        return
    handler = _Counting(hidden)
    # The root logger, and libraries' own loggers that print themselves (torch's), go to the counter.
    own = [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
        and not logger.propagate
        and logger.handlers
        and not name.startswith("peftc")
    ]
    saved = [(logger, logger.handlers) for logger in [logging.getLogger(), *own]]
    for logger, _ in saved:
        logger.handlers = [handler]

    def count(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if category.__module__.startswith("peftc"):  # peftc's own warnings are for the user: shown
            show(message, category, filename, lineno, file, line)
        else:
            hidden.sources[_source(filename)] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            show, warnings.showwarning = warnings.showwarning, count
            yield hidden
    finally:
        for logger, handlers in saved:
            logger.handlers = handlers


def _source(filename: str) -> str:
    """The package a warning came from: its file's, or, when a ``stacklevel`` points into the standard
    library (torch warns through ``copyreg``), that of the innermost installed package on the stack."""
    package = _package(filename)
    frame = sys._getframe(2)
    while (package is None or package in _ON_BEHALF) and frame is not None:
        package = _package(frame.f_code.co_filename)
        frame = frame.f_back
    return package or Path(filename).stem


_ON_BEHALF = frozenset({"typing_extensions", "deprecated"})
"""Packages whose warnings speak for their caller (``@deprecated`` wrappers)."""


def _package(filename: str) -> str | None:
    """The top-level installed package (``torch``, ``transformers``…) ``filename`` belongs to."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return Path(parts[parts.index(marker) + 1]).stem
    return None
