"""The IR: a ``torch.export.ExportedProgram`` and the few operations passes need on it.

peftc works on the program exactly as ``torch.export.export`` returns it (functional ATen with
``aten.linear``/``aten.conv*``/``aten.embedding``/``aten.layer_norm``/``aten.scaled_dot_product_attention``
kept whole), plus ``peftc::`` site ops. It never decomposes: the ONNX exporter and AOTInductor run
their own decompositions, and keeping the high-level ops keeps site discovery trivial.

Parameters are lifted placeholders listed in the graph signature, with their tensors in
``state_dict``. :class:`ProgramEditor` is the only way passes change a program: it copies the graph
and signature (tensors are shared, never mutated in place), lets the pass add, replace and remove
parameters and nodes, and builds a new ``ExportedProgram`` in :meth:`ProgramEditor.finish`.
The input program is left untouched.
"""

from __future__ import annotations

import copy
import hashlib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    TensorArgument,
)

from peftc.errors import UnsupportedError
from peftc.ir import meta

Program = ExportedProgram
_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def trace(
    module: torch.nn.Module,
    example: Mapping[str, torch.Tensor],
    dynamic_shapes: Mapping[str, Mapping[int, Any]],
    *,
    runtime_asserts: bool = False,
) -> Program:
    """Export ``module(**example)`` with the given dynamic dims (a ``torch.export.Dim`` per axis).

    ``runtime_asserts``: guards on the dynamic dims that torch cannot prove become assertions in the
    program (``prefer_deferred_runtime_asserts_over_guards``) instead of failing the export.

    Raises:
        UnsupportedError: torch.export cannot trace the module; the message keeps torch's first line.
    """
    try:
        with torch.no_grad():
            return torch.export.export(
                module,
                (),
                dict(example),
                dynamic_shapes=dict(dynamic_shapes),
                strict=False,
                prefer_deferred_runtime_asserts_over_guards=runtime_asserts,
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedError(f"torch.export could not trace {type(module).__name__}: {first}") from e


def output_names(program: Program) -> list[str]:
    """One name per flat output, from the output pytree (``last_hidden_state``, ``0``, ``logits``...)."""
    spec = program.call_spec.out_spec
    return list(flatten_named(pytree.tree_unflatten(list(range(spec.num_leaves)), spec)))


def flatten_named(tree: Any) -> dict[str, Any]:
    """Flatten a pytree of outputs to ``{name: leaf}`` with the names :func:`output_names` uses."""
    out = {}
    for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out[".".join(parts) or "output"] = leaf
    return out


def user_input_names(program: Program) -> list[str]:
    return list(program.graph_signature.user_inputs)


def index_ranges(program: Program) -> dict[str, tuple[int, int]]:
    """User inputs read as ``aten.embedding`` indices → ``[0, rows)`` of the smallest such embedding:
    the values the model can look up (the vocabulary of ``input_ids``)."""
    inputs = set(user_input_names(program))
    ranges: dict[str, tuple[int, int]] = {}
    for node in program.graph.nodes:
        if node.target is not torch.ops.aten.embedding.default or len(node.args) < 2:
            continue
        weight, indices = node.args[0], node.args[1]
        rows = getattr(weight, "meta", {}).get("val")
        if not (isinstance(indices, fx.Node) and indices.name in inputs and rows is not None and rows.dim() == 2):
            continue
        high = rows.shape[0]
        if isinstance(high, int):
            ranges[indices.name] = (0, min(high, ranges.get(indices.name, (0, high))[1]))
    return ranges


def state_tensor(program: Program, node: fx.Node) -> torch.Tensor | None:
    """The tensor behind a parameter/buffer/constant placeholder, else None."""
    spec = _spec_by_name(program.graph_signature.input_specs).get(node.name)
    if spec is None or spec.kind not in _STATE_KINDS:
        return None
    return _lookup(spec, program.state_dict, program.constants)


def placeholder_fqn(program: Program, node: fx.Node) -> str | None:
    """The state-dict key of a parameter/buffer/constant placeholder, else None."""
    spec = _spec_by_name(program.graph_signature.input_specs).get(node.name)
    return spec.target if spec is not None and spec.kind in _STATE_KINDS else None


def state_digest(program: Program) -> str:
    """sha256 over every parameter and buffer (key, dtype, shape, bytes): the identity of a base model."""
    h = hashlib.sha256()
    for key, t in sorted(program.state_dict.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def validate(program: Program) -> None:
    """Run torch's verifier plus peftc's invariants (see ``peftc/passes/README.md``)."""
    program.validate()
    names = set(_spec_by_name(program.graph_signature.input_specs))
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    if [n.name for n in placeholders] != [s.arg.name for s in program.graph_signature.input_specs]:
        raise AssertionError("placeholders and graph signature disagree")
    for node in program.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta and _returns_value(node):
            raise AssertionError(f"node {node.name} ({node.target}) has no meta['val']")
        if node.op == "placeholder" and node.name not in names:
            raise AssertionError(f"placeholder {node.name} missing from the graph signature")


class ProgramEditor:
    """A mutable copy of a program. Build a new program with :meth:`finish`.

    The copy shares tensors with the source program; tensors are replaced, never written in place.
    """

    def __init__(self, program: Program, pass_name: str | None = None) -> None:
        self.source = program
        self.pass_name = pass_name
        self.graph_module: fx.GraphModule = copy.deepcopy(program.graph_module)
        self.graph: fx.Graph = self.graph_module.graph
        signature = copy.deepcopy(program.graph_signature)
        self.input_specs: list[InputSpec] = list(signature.input_specs)
        self.output_specs = list(signature.output_specs)
        self.state_dict: dict[str, Any] = dict(program.state_dict)
        self.constants: dict[str, Any] = dict(program.constants)
        vals = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        self.fake_mode = torch._guards.detect_fake_mode(vals)
        self._extra_kwargs: list[str] = []
        self._extra_examples: dict[str, torch.Tensor] = {}

    # -- state ---------------------------------------------------------------------------------
    def spec(self, node: fx.Node) -> InputSpec | None:
        return _spec_by_name(self.input_specs).get(node.name)

    def fqn(self, node: Any) -> str | None:
        """State-dict key of a parameter/buffer/constant placeholder node, else None."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        spec = self.spec(node)
        return spec.target if spec is not None and spec.kind in _STATE_KINDS else None

    def tensor(self, node: Any) -> torch.Tensor | None:
        spec = self.spec(node) if isinstance(node, fx.Node) and node.op == "placeholder" else None
        if spec is None or spec.kind not in _STATE_KINDS:
            return None
        return _lookup(spec, self.state_dict, self.constants)

    def node_for(self, fqn: str) -> fx.Node | None:
        """The placeholder of a parameter/buffer/constant by state-dict key."""
        names = {s.target: s.arg.name for s in self.input_specs if s.kind in _STATE_KINDS}
        name = names.get(fqn)
        return next((n for n in self.graph.nodes if n.op == "placeholder" and n.name == name), None)

    def has_state(self, fqn: str) -> bool:
        return any(s.target == fqn for s in self.input_specs if s.kind in _STATE_KINDS)

    def add_parameter(self, fqn: str, tensor: torch.Tensor, **annotations: Any) -> fx.Node:
        """Add ``tensor`` as a new parameter ``fqn`` and return its placeholder."""
        if self.has_state(fqn) or fqn in self.state_dict:
            raise ValueError(f"state-dict key {fqn!r} already exists")
        kinds = [s.kind for s in self.input_specs]
        # Parameters come first in a torch.export signature; keep that order.
        index = max((i + 1 for i, k in enumerate(kinds) if k == InputKind.PARAMETER), default=0)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        anchor = placeholders[index] if index < len(placeholders) else None
        ctx = (
            self.graph.inserting_before(anchor)
            if anchor is not None
            else self.graph.inserting_after(placeholders[-1] if placeholders else None)
        )
        with ctx:
            node = self.graph.placeholder(_identifier("p_" + fqn))
        node.meta["val"] = self._fake(tensor)
        if annotations:
            meta.peftc_meta(node).update(annotations)
        self.state_dict[fqn] = torch.nn.Parameter(tensor.detach(), requires_grad=False)
        self.input_specs.insert(index, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), fqn))
        return node

    def user_input(self, name: str) -> fx.Node | None:
        """The placeholder of user input ``name``, if the program has one."""
        names = {s.arg.name for s in self.input_specs if s.kind == InputKind.USER_INPUT}
        return next((n for n in self.graph.nodes if n.op == "placeholder" and n.name == name and name in names), None)

    def add_user_input(self, name: str, like: torch.Tensor) -> fx.Node:
        """Add a keyword input ``name`` shaped like the fake value ``like`` (symbolic dims kept).

        It becomes the last user input and the last entry of the program's keyword inputs.
        """
        if any(n.op == "placeholder" and n.name == name for n in self.graph.nodes):
            raise ValueError(f"the program already has a placeholder named {name!r}")
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        with self.graph.inserting_after(placeholders[-1]):
            node = self.graph.placeholder(name)
        node.meta["val"] = like
        self.input_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(node.name), None))
        self._extra_kwargs.append(name)
        self._extra_examples[name] = torch.zeros(self._concrete(like.shape), dtype=like.dtype)
        return node

    def _concrete(self, shape: Sequence[Any]) -> list[int]:
        """``shape`` with each symbolic dim replaced by its size in the program's example inputs."""
        sizes: dict[str, int] = {}
        examples = pytree.tree_leaves(self.source.example_inputs or ((), {}))
        users = [s.arg.name for s in self.source.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        nodes = {n.name: n for n in self.source.graph.nodes if n.op == "placeholder"}
        for name, example in zip(users, examples, strict=False):
            for dim, size in zip(nodes[name].meta["val"].shape, getattr(example, "shape", ()), strict=False):
                sizes.setdefault(str(dim), int(size))
        return [d if isinstance(d, int) else sizes[str(d)] for d in shape]

    def set_tensor(self, fqn: str, tensor: torch.Tensor) -> None:
        """Replace the value behind state-dict key ``fqn`` (shape and dtype may change)."""
        node = self.node_for(fqn)
        if node is None:
            raise KeyError(fqn)
        spec = self.spec(node)
        value: Any = tensor.detach()
        if spec.kind == InputKind.PARAMETER:
            value = torch.nn.Parameter(value, requires_grad=False)
        if fqn in self.state_dict:
            self.state_dict[fqn] = value
        else:
            self.constants[fqn] = value
        node.meta["val"] = self._fake(tensor)

    # -- nodes ---------------------------------------------------------------------------------
    def call(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        *,
        like: fx.Node,
        before: fx.Node | None = None,
    ) -> fx.Node:
        """Insert ``target(*args)`` before ``before`` (default ``like``), with ``like``'s source meta."""
        with self.graph.inserting_before(before if before is not None else like):
            node = self.graph.call_function(target, args)
        meta.inherit(node, like, self.pass_name)
        node.meta["val"] = self._run_fake(target, args)
        return node

    def replace(self, old: fx.Node, new: fx.Node, region: Iterable[fx.Node] = ()) -> None:
        """Reroute users of ``old`` to ``new`` and erase ``old`` and the rest of ``region``."""
        old.replace_all_uses_with(new)
        doomed = [old, *[n for n in region if n is not old]]
        for node in reversed(_topo_order(self.graph, doomed)):
            if node.users:
                raise AssertionError(f"cannot erase {node.name}: still used by {list(node.users)}")
            self.graph.erase_node(node)

    def remove_unused_state(self) -> list[str]:
        """Drop parameter/buffer/constant placeholders nothing uses; return their keys."""
        removed = []
        for node in [n for n in self.graph.nodes if n.op == "placeholder"]:
            spec = self.spec(node)
            if spec is None or spec.kind not in _STATE_KINDS or node.users:
                continue
            self.graph.erase_node(node)
            self.input_specs.remove(spec)
            if not any(s.target == spec.target for s in self.input_specs):
                self.state_dict.pop(spec.target, None)
                self.constants.pop(spec.target, None)
            removed.append(spec.target)
        return removed

    def eliminate_dead_code(self) -> int:
        """Remove side-effect-free nodes whose results are unused; return how many went."""
        before = len(self.graph.nodes)
        self.graph.eliminate_dead_code()
        return before - len(self.graph.nodes)

    def finish(self) -> Program:
        """Build the edited program. Output specs follow the graph's output node."""
        self.graph.lint()
        outputs = next(n for n in reversed(self.graph.nodes) if n.op == "output").args[0]
        flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        specs = []
        for spec, value in zip(self.output_specs, flat, strict=True):
            if isinstance(spec.arg, TensorArgument) and isinstance(value, fx.Node):
                spec = copy.copy(spec)
                spec.arg = TensorArgument(value.name)
            specs.append(spec)
        self.graph_module.recompile()
        with warnings.catch_warnings():  # copying torch's own TreeSpecs trips its LeafSpec deprecation
            warnings.simplefilter("ignore", FutureWarning)
            call_graph = copy.deepcopy(self.source.module_call_graph)
        examples = self.source.example_inputs
        if self._extra_examples and examples is not None:
            examples = (examples[0], {**examples[1], **self._extra_examples})
        if self._extra_kwargs:
            signature = call_graph[0].signature
            signature.in_spec = _with_kwargs(signature.in_spec, self._extra_kwargs)
            if signature.forward_arg_names is not None:
                # The unlifted module's forward() takes exactly the program's inputs, in this order:
                # torch re-traces it passing keyword inputs positionally.
                args, kwargs = pytree.tree_unflatten([None] * signature.in_spec.num_leaves, signature.in_spec)
                signature.forward_arg_names = [*signature.forward_arg_names[: len(args)], *kwargs]
        return ExportedProgram(
            root=self.graph_module,
            graph=self.graph,
            graph_signature=ExportGraphSignature(self.input_specs, specs),
            state_dict=self.state_dict,
            range_constraints=self.source.range_constraints,
            module_call_graph=call_graph,
            example_inputs=examples,
            constants=self.constants,
            verifiers=[self.source.verifier],
        )

    # -- fake values ---------------------------------------------------------------------------
    def _fake(self, tensor: torch.Tensor) -> Any:
        return self.fake_mode.from_tensor(tensor, static_shapes=True)

    def _run_fake(self, target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        fake_args = fx.node.map_arg(args, lambda n: n.meta["val"])
        with self.fake_mode:
            return target(*fake_args)


def _with_kwargs(in_spec: pytree.TreeSpec, names: list[str]) -> pytree.TreeSpec:
    """The ``(args, kwargs)`` input spec with ``names`` appended to the keyword inputs."""
    args, kwargs = pytree.tree_unflatten([None] * in_spec.num_leaves, in_spec)
    if not isinstance(kwargs, dict):
        raise UnsupportedError("the program's inputs are not (args, kwargs); cannot add an input")
    return pytree.tree_flatten((args, {**kwargs, **dict.fromkeys(names)}))[1]


def user_outputs_only(program: Program) -> bool:
    """True when the program has no mutation outputs (buffers, inputs) — the case peftc handles."""
    return all(s.kind == OutputKind.USER_OUTPUT for s in program.graph_signature.output_specs)


def _returns_value(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is None or len(schema.returns) > 0


def _lookup(spec: InputSpec, state_dict: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
    if spec.target in state_dict:
        return state_dict[spec.target]
    return constants.get(spec.target)


def _spec_by_name(specs: Iterable[InputSpec]) -> dict[str, InputSpec]:
    return {s.arg.name: s for s in specs if hasattr(s.arg, "name")}


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _topo_order(graph: fx.Graph, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    wanted = set(nodes)
    return [n for n in graph.nodes if n in wanted]
