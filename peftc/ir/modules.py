"""The base model's modules as seen in the exported graph.

Adapters name modules (``encoder.layer.0.attention.self.query``); the graph has nodes. This module
joins the two through ``node.meta["nn_module_stack"]`` (recorded by torch.export and preserved by
``.pt2`` serialization), so site discovery never guesses from tensor names.

A :class:`ModuleCall` is one execution of a module: the nodes produced inside its ``forward``, the
tensor values flowing in from outside, and the single value flowing out. Insertion replaces a whole
call by one ``peftc::`` node; this works whatever ATen ops the module lowered to (``aten.linear`` for
``nn.Linear``; ``view``/``addmm``/``view`` for GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from peftc.ir import meta
from peftc.ir.program import Program


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """One execution of a module in the graph."""

    path: str
    key: str
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """A module of the base model: its type, its own parameters and its calls."""

    path: str
    type_name: str
    params: Mapping[str, str]  # local name ("weight") -> state-dict key
    calls: tuple[ModuleCall, ...]

    @property
    def class_name(self) -> str:
        return self.type_name.rsplit(".", 1)[-1]


class ModuleTable(Mapping[str, ModuleInfo]):
    """``path -> ModuleInfo`` for every module that executes in the program."""

    def __init__(
        self,
        modules: Mapping[str, ModuleInfo],
        state_shapes: Mapping[str, tuple[int, ...]],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ):
        self._modules = dict(modules)
        self.state_shapes = dict(state_shapes)
        self.tensors = dict(tensors or {})
        """Read-only access to the base parameters, for parsers that derive tensors from them."""

    def __getitem__(self, path: str) -> ModuleInfo:
        return self._modules[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def module_table(program: Program) -> ModuleTable:
    """Collect every module that has nodes in the graph, with its calls and parameters."""
    signature = program.graph_signature
    state_names = {
        s.arg.name
        for s in signature.input_specs
        if s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    }
    types: dict[str, str] = {}
    members: dict[tuple[str, str], list[fx.Node]] = {}
    for node in program.graph.nodes:
        for key, path, type_name in meta.module_stack(node):
            types.setdefault(path, type_name)
            members.setdefault((path, key), []).append(node)

    calls: dict[str, list[ModuleCall]] = {}
    for (path, key), nodes in members.items():
        inside = set(nodes)
        inputs: list[fx.Node] = []
        for node in nodes:
            for arg in node.all_input_nodes:
                external = arg not in inside and arg.name not in state_names
                if external and meta.is_tensor_node(arg) and arg not in inputs:
                    inputs.append(arg)
        outputs = tuple(n for n in nodes if any(u not in inside for u in n.users))
        calls.setdefault(path, []).append(ModuleCall(path, key, tuple(nodes), tuple(inputs), outputs))

    params: dict[str, dict[str, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    tensors = {**program.state_dict, **program.constants}
    for spec in signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target:
            owner, _, local = spec.target.rpartition(".")
            params.setdefault(owner, {})[local] = spec.target
            tensor = tensors.get(spec.target)
            if tensor is not None:
                shapes[spec.target] = tuple(tensor.shape)
    _lend_unexecuted(params, set(types))
    modules = {path: ModuleInfo(path, types[path], params.get(path, {}), tuple(calls.get(path, ()))) for path in types}
    return ModuleTable(modules, shapes, {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)})


def _lend_unexecuted(params: dict[str, dict[str, str]], executing: set[str]) -> None:
    """Give the parameters of a submodule that never executes itself to its nearest executing ancestor,
    under their dotted local name: ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside its own
    call (``out_proj`` is never called), so the parameter is ``attn``'s ``"out_proj.weight"``."""
    for owner, own in list(params.items()):
        if owner in executing:
            continue
        ancestor = owner
        while "." in ancestor:
            ancestor = ancestor.rpartition(".")[0]
            if ancestor in executing:
                lent = params.setdefault(ancestor, {})
                for local, fqn in own.items():
                    lent.setdefault(f"{owner[len(ancestor) + 1 :]}.{local}", fqn)
                break


def module_table_from_module(module: torch.nn.Module) -> ModuleTable:
    """A table of every submodule of ``module`` and its parameters, without tracing.

    Used to parse adapters against a base that is not traced again (``peftc add-adapter``): every
    module counts as called once, and calls carry no nodes, so call-derived facts (convolution
    attributes) are unknown.
    """
    modules, shapes, tensors = {}, {}, {}
    for path, sub in module.named_modules(remove_duplicate=False):
        if not path:
            continue
        params = {}
        for local, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            fqn = f"{path}.{local}"
            params[local] = fqn
            shapes[fqn] = tuple(tensor.shape)
            tensors[fqn] = tensor  # the object itself: tied parameters stay identical
        modules[path] = ModuleInfo(path, type(sub).__name__, params, (ModuleCall(path, path, (), (), ()),))
    return ModuleTable(modules, shapes, tensors)


_CONV = {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"}


def conv_attributes(module: ModuleInfo) -> dict[str, object] | None:
    """``stride``, ``padding``, ``dilation``, ``groups`` of a convolution module's first call, and
    whether the call does more than the convolution (``padding_mode`` other than zeros adds a pad).
    None when the module's call has no convolution."""
    from peftc.ir.canon import target_name

    if not module.calls:
        return None
    nodes = [n for n in module.calls[0].nodes if n.op == "call_function"]
    conv = next((n for n in nodes if target_name(n) in _CONV), None)
    if conv is None:
        return None
    args = list(conv.args) + [None] * 7
    rank = conv.args[1].meta["val"].dim() - 2
    default = (1,) * rank
    padding = args[4] if args[4] is not None else (0,) * rank
    extra = [target_name(n) for n in nodes if n is not conv and not target_name(n).startswith("aten.sym_")]
    return {
        "stride": tuple(args[3] or default),
        "padding": padding if isinstance(padding, str) else tuple(padding),
        "dilation": tuple(args[5] or default),
        "groups": int(args[6] or 1) if target_name(conv) != "aten.convolution" else int(args[8] or 1),
        "extra_ops": extra,
    }
