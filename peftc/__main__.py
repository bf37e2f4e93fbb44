"""``python -m peftc`` and the ``peftc`` command."""

import os
import sys

from peftc.cli import main


def run() -> None:
    """Run the CLI; :func:`peftc.cli.main`'s status is the process's exit status.

    After an interrupt (130, 143) the process ends with ``os._exit`` once its output is flushed:
    CPython marks a KeyboardInterrupt that passes through C code running Python source (pybind11's
    ``exec`` inside torch imports) as unhandled, and then ends the process by SIGINT at exit even
    though peftc handled it and cleaned up — a SIGTERM'd compile would report SIGINT, not 143.
    """
    code = main()
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
