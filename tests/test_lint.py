"""The code base stays lint-clean (ruff, configured in pyproject.toml; it also bans pickle and
top-level imports of onnxruntime/TensorRT outside the backends)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "peftc", "tests"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
