"""Scratch directories for module-level test data, removed when the test process exits."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def work_dir(prefix: str) -> Path:
    """A new temporary directory named ``prefix…``, deleted (with its contents) at interpreter exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path
