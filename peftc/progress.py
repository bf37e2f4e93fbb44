"""Progress of long work: one line per stage, and on a terminal a live tqdm bar inside each stage.

Every peftc entry point takes ``progress``: any callable that takes a message (one per stage or
pass). :class:`Bar` is such a callable on top of tqdm: it prints each message as a line and keeps a
bar under them showing the running stage, its elapsed time (ticking even while an opaque call such
as an AOTInductor compile or an ONNX export runs) and, where the work is counted (verification
cases, quantization trials, TensorRT build steps), ``done/total``. The CLI uses it when stderr is a
terminal and plain timestamped lines otherwise (CI logs, pipes); from Python::

    from peftc.progress import Bar

    with Bar() as bar:
        peftc.compile(model, adapter, out="out/", progress=bar)

Counted work calls :func:`advance`, which reaches the progress of the enclosing :func:`reporting`
block if it has an ``advance`` method (a plain callable does not need one).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

Progress = Callable[[str], None]

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("peftc_progress", default=None)


@contextlib.contextmanager
def reporting(progress: Progress | None) -> Iterator[None]:
    """Make ``progress`` the target of :func:`advance` within the block (this thread and context)."""
    token = _current.set(progress)
    try:
        yield
    finally:
        _current.reset(token)


def advance(done: int, total: int) -> None:
    """Counted work inside the running stage: ``done`` of ``total`` steps."""
    method = getattr(_current.get(), "advance", None)
    if method is not None:
        method(done, total)


class Lines:
    """Timestamped lines on ``file`` (default stderr): the CLI's progress when stderr is not a terminal."""

    EVERY = 10.0
    """Counted work prints a line when the last line is this many seconds old."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file
        self.start = self.said = time.perf_counter()

    def __call__(self, message: str) -> None:
        self.said = time.perf_counter()
        print(f"[peftc {self.said - self.start:6.1f}s] {message}", file=self.file or sys.stderr, flush=True)

    def advance(self, done: int, total: int) -> None:
        if time.perf_counter() - self.said >= self.EVERY:
            self(f"  {done}/{total}")

    def close(self) -> None:
        pass


class Bar(Lines):
    """Stage lines plus a live tqdm bar for the running stage (see the module docstring)."""

    OPEN = "{desc}  {elapsed}"
    COUNTED = "{desc}  {bar:24} {n_fmt}/{total_fmt}  {elapsed}"

    def __init__(self, file: TextIO | None = None, tick: float = 0.5) -> None:
        from tqdm import tqdm

        super().__init__(file)
        self._bar = tqdm(total=None, file=file or sys.stderr, bar_format=self.OPEN, leave=False, dynamic_ncols=True)
        self._done = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True, name="peftc-progress")
        self._ticker.start()

    def __call__(self, message: str) -> None:
        bar = self._bar
        with bar.get_lock():
            bar.write(f"[peftc {time.perf_counter() - self.start:6.1f}s] {message}", file=bar.fp)
            bar.reset(total=None)
            bar.bar_format = self.OPEN
            bar.set_description_str(message[:60], refresh=True)

    def advance(self, done: int, total: int) -> None:
        bar = self._bar
        with bar.get_lock():
            if bar.total != total:
                bar.total, bar.bar_format = total, self.COUNTED
            bar.n = done
            bar.refresh()

    def _tick(self, interval: float) -> None:
        while not self._done.wait(interval):
            with self._bar.get_lock():
                self._bar.refresh()

    def close(self) -> None:
        self._done.set()
        self._ticker.join()
        self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
