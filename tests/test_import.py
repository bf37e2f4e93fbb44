"""``import peftc`` stays light: no onnxruntime or TensorRT (and not even torch) until used."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_peftc_imports_no_runtime():
    result = _run(
        "import sys\n"
        "for name in ('onnxruntime', 'tensorrt', 'tensorrt_rtx'): sys.modules[name] = None  # import would fail\n"
        "import peftc\n"
        "assert 'torch' not in sys.modules, 'import peftc pulled in torch'\n"
        "import peftc.api, peftc.passes, peftc.backends, peftc.runtime, peftc.backends.onnx\n"
        "import peftc.backends.aoti, peftc.backends.tensorrt, peftc.backends.tensorrt.settings\n"
        "print('ok')\n"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_inspect_needs_no_torch(tmp_path):
    result = _run(
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from peftc.cli import main\n"
        f"sys.exit(main(['inspect', {str(tmp_path)!r}]))\n"
    )
    assert result.returncode == 2 and "manifest.json: missing" in result.stderr
