"""``python -m peftc`` and the ``peftc`` command."""

from peftc.cli import main
from peftc.interrupts import exit_with


def run() -> None:
    """Run the CLI; :func:`peftc.cli.main`'s status is the process's exit status (:func:`exit_with`)."""
    exit_with(main())


if __name__ == "__main__":
    run()
