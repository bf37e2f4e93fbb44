"""Canonical, name-free views of a program for tests, ``--dump-ir`` and contract checks.

``op_counts`` gives ``{"aten.linear": 4, "peftc.lora_linear": 2}``; ``fingerprint`` digests the
text with the signature and tensor identities. ``text`` prints one line per node
with values numbered in graph order and parameters shown by state-dict key, so two programs that
compute the same thing with different node names print the same text (TVM's structural equality,
FX edition). Shapes come from the recorded fake values; symbolic dims print as their symbols.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import torch
from torch import fx

from peftc.ir.program import Program, placeholder_fqn


def target_name(node: fx.Node) -> str:
    """``aten.linear`` / ``peftc.lora_linear`` / ``getitem`` for a call_function node."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def op_counts(program: Program) -> Counter[str]:
    """How many call_function nodes of each op the program has."""
    return Counter(target_name(n) for n in program.graph.nodes if n.op == "call_function")


def text(program: Program) -> str:
    """The canonical text of the graph (see module docstring)."""
    names: dict[fx.Node, str] = {}
    lines = []
    count = 0
    for node in program.graph.nodes:
        if node.op == "placeholder":
            fqn = placeholder_fqn(program, node)
            names[node] = f"param[{fqn}]" if fqn else f"input[{node.name}]"
            if not fqn:
                lines.append(f"{names[node]} :: {_shape(node)}")
            continue
        if node.op == "output":
            lines.append(f"return {_render(node.args[0], names)}")
            continue
        names[node] = f"%{count}"
        count += 1
        args = ", ".join(_render(a, names) for a in node.args)
        if node.kwargs:
            args += ", " + ", ".join(f"{k}={_render(v, names)}" for k, v in node.kwargs.items())
        lines.append(f"{names[node]} = {target_name(node)}({args}) :: {_shape(node)}")
    return "\n".join(lines) + "\n"


def fingerprint(program: Program) -> str:
    """A digest of the graph, signature and tensor identities (not contents).

    Used by the pass manager to catch a pass that mutates its input or misreports ``modified``.
    In-place weight edits are caught by ``tensor._version`` and, for writes through ``.data`` (which
    bypass the version counter), by a checksum of a strided sample of each tensor's contents
    (at most 4096 elements, so fingerprinting a 100M-parameter model stays in milliseconds).
    """
    h = hashlib.sha256(text(program).encode())
    h.update(str(program.graph_signature).encode())
    for key, t in sorted({**program.state_dict, **program.constants}.items()):
        if isinstance(t, torch.Tensor):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)]
            checksum = float(sample.sum(dtype=torch.float64)) if sample.numel() else 0.0
            h.update(f"{key}:{id(t)}:{t._version}:{tuple(t.shape)}:{t.dtype}:{checksum!r}".encode())
    return h.hexdigest()


def _render(value: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(value, fx.Node):
        return names.get(value, value.name)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_render(v, names) for v in value)
        return f"[{inner}]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_shape_of(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "?"


def _shape_of(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}[{', '.join(str(d) for d in val.shape)}]"
    return str(val)
