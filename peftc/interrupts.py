"""SIGTERM handled like SIGINT: it raises :class:`KeyboardInterrupt`, so a compile cleans up.

``kill PID`` (and job schedulers, containers and ``timeout``, which send SIGTERM) would otherwise end
Python at once, leaving the compile's temporary directory behind. Only the CLI installs the handler;
the library does not touch process-wide signal handling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, the first SIGTERM raises :class:`KeyboardInterrupt` and later ones are
    ignored while the cleanup runs; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_with(code: int) -> NoReturn:
    """End the process with ``code``; after an interrupt (130, 143) with ``os._exit`` once output is flushed.

    CPython marks a KeyboardInterrupt that passed through C code running Python source (pybind11's
    ``exec`` inside torch imports) as unhandled, and then ends the process by SIGINT at exit even though
    peftc handled it and cleaned up: a SIGTERM'd compile would report SIGINT, not 143.
    """
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
