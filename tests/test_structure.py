"""The package's shape: no import cycle, every module importable on its own, small files and functions.

An import is an edge from the importing module to the module it names (``from pkg import sub`` names
``pkg.sub`` when that is a module); imports inside functions count, those under ``TYPE_CHECKING`` do
not (they never run). A cycle is a strongly connected set of modules in that graph.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS = {("peftc.cli", "parser")}  # argparse declarations


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "peftc").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            module = base if node.level else node.module or ""
            out.update(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names)
    return {m for m in out if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    """The check itself: a two-module cycle and a three-module one are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh process (forked after the heavy third-party imports), so
    none depends on another peftc module having been imported before it."""
    script = textwrap.dedent(
        """
        import importlib, os, sys
        # third-party only (what peftc modules import at module level, imported once so that each fork
        # pays only for peftc's own modules); no peftc module is imported yet
        import numpy, onnx, onnxruntime, onnxscript, safetensors.torch, sympy, torch, transformers
        import torch._decomp.decompositions, torch._export.utils, torch._prims, torch.export
        import torch.fx.passes.infra.pass_base, torch.fx.passes.shape_prop
        assert not [m for m in sys.modules if m.startswith("peftc.")]
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException as e:
                    print(f"{name}: {type(e).__name__}: {e}", flush=True)
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1]:
                failed.append(name)
        print("failed:", failed)
        """
    )
    names = [n for n in _modules() if n != "peftc.__main__"]
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("failed: []"), result.stdout + result.stderr


def test_files_and_functions_stay_small():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path}: {len(text.splitlines())} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in LONG_FUNCTIONS:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert too_long == []
