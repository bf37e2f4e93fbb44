"""Node metadata: where a node came from and what peftc knows about it.

peftc keeps all of its own annotations under one key, ``node.meta["peftc"]`` (a plain dict), so they
survive graph copies and never collide with torch's keys. Placeholders created for adapter tensors
carry ``{"adapter": name, "source": "<file>:<safetensors key>"}``; site nodes carry
``{"adapter": name, "module": path, "site": "<method>"}``; nodes written by a pass carry
``{"from_pass": pass name}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

PEFTC = "peftc"


def peftc_meta(node: fx.Node) -> dict[str, Any]:
    """The node's peftc annotations (created empty on first use)."""
    return node.meta.setdefault(PEFTC, {})


def module_stack(node: fx.Node) -> list[tuple[str, str, str]]:
    """``[(call key, module path, module type), ...]`` from outermost to innermost module."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, type_) in stack.items():
        type_name = type_ if isinstance(type_, str) else f"{type_.__module__}.{type_.__qualname__}"
        out.append((key, path, type_name))
    return out


def module_path(node: fx.Node) -> str | None:
    """Path of the innermost module whose forward produced this node, or None at top level."""
    stack = module_stack(node)
    return stack[-1][1] if stack else None


def fake_value(node: fx.Node) -> Any:
    """The node's fake (shape-only) value as torch.export recorded it."""
    return node.meta.get("val")


def is_tensor_node(node: Any) -> bool:
    """True for a graph node whose value is a tensor."""
    return isinstance(node, fx.Node) and isinstance(fake_value(node), torch.Tensor)


def inherit(new: fx.Node, anchor: fx.Node, pass_name: str | None = None) -> None:
    """Give ``new`` the source location and module scope of the node it replaces."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in anchor.meta:
            new.meta[key] = anchor.meta[key]
    if pass_name:
        peftc_meta(new)["from_pass"] = pass_name
