"""Running the ``peftc`` command line in-process from tests, and reading its one-line errors."""

from __future__ import annotations

from peftc.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``peftc ARGV``: its exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line of ``err`` (progress lines left out); no traceback."""
    lines = [line for line in err.splitlines() if not line.startswith("[peftc")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]
