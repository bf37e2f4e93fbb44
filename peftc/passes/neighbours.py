"""The layers an activation transform can fold into: the one producing a value, or those reading it.

``fold-ssf`` and ``fold-linear-adapters`` both fold an affine map of an activation ``y = A(x)`` into
a neighbouring layer. That is exact only when the layer's weights see every value ``A`` changes and
nothing else does:

* **producer**: ``x`` comes from a Linear, a convolution or a normalization layer with an affine,
  through nothing but layout ops (permute, transpose, reshape/view/flatten that keep the channel
  axis whole, contiguous, eval dropout), and nothing else reads ``x`` or those intermediate values
  (a residual branch reading ``x`` would see the change);
* **consumers**: every reader of ``y``, through layout ops, is a Linear or convolution reading it as its
  input, with the transformed axis as its input channels.

The channel axis is tracked through the layout ops with the recorded fake shapes. Readers that only
look at a shape (``aten.sym_size``) do not count. :func:`producer_of` and :func:`consumers_of` return
the layers, or the reason none qualifies, which the passes report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

from peftc import ir
from peftc.passes.base import fresh_name

SHAPE_ONLY = {"aten.sym_size", "aten.sym_numel", "aten.sym_stride"}
IDENTITY = {"aten.contiguous", "aten.clone", "aten.alias", "aten.detach", "aten.dropout"}
RESHAPE = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.flatten", "aten.unflatten"}
CONV = {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"}
NORM = {"aten.layer_norm": (2, 3), "aten.group_norm": (2, 3), "aten.batch_norm": (1, 2)}


@dataclasses.dataclass(frozen=True)
class Layer:
    """A Linear, convolution or normalization node whose parameters a transform can fold into."""

    node: fx.Node
    kind: str
    """``linear``, ``conv`` or ``norm``."""
    weight_index: int
    bias_index: int

    @property
    def weight(self) -> fx.Node | None:
        return _arg(self.node, self.weight_index)

    @property
    def bias(self) -> fx.Node | None:
        return _arg(self.node, self.bias_index)

    @property
    def label(self) -> str:
        return f"{ir.target_name(self.node)} ({ir.meta.module_path(self.node) or self.node.name})"


def producer_of(
    editor: ir.ProgramEditor, value: fx.Node, axis: int, kinds: Sequence[str], reader: fx.Node
) -> Layer | str:
    """The layer producing ``value`` (read by ``reader``) whose output channels are ``value``'s ``axis``."""
    node = value
    while True:
        others = [u for u in _value_users(node) if u is not reader]
        if others:
            return (
                f"the output of {ir.target_name(node)} is also read by {ir.target_name(others[0])} "
                f"({others[0].name}); folding into it would change that reader too"
            )
        name = ir.target_name(node) if node.op == "call_function" else node.op
        if name in IDENTITY and _is_identity(node):
            reader, node = node, node.args[0]
            continue
        mapped = _axis_backward(node, axis)
        if mapped is not None:
            reader, node, axis = node, node.args[0], mapped
            continue
        layer = _layer(node, kinds)
        if layer is None:
            return f"it is produced by {name}, not by a {' or '.join(_KIND_NAMES[k] for k in kinds)}"
        rank = _rank(node)
        expected = rank - 1 if layer.kind == "linear" or name == "aten.layer_norm" else 1
        if axis != expected:
            return f"its axis {axis} is not the channel axis ({expected}) of {layer.label}"
        if name == "aten.layer_norm" and len(node.args[1]) != 1:
            return f"{layer.label} normalizes over several axes {list(node.args[1])}"
        return _checked(editor, layer)


def consumers_of(editor: ir.ProgramEditor, value: fx.Node, axis: int, kinds: Sequence[str]) -> list[Layer] | str:
    """Every layer reading ``value`` (through layout ops) with ``value``'s ``axis`` as its input channels."""
    layers: list[Layer] = []
    for user in _value_users(value):
        name = ir.target_name(user) if user.op == "call_function" else user.op
        if user.op == "call_function" and user.args and user.args[0] is value:
            layer = _layer(user, kinds)
            if layer is not None and value not in (layer.weight, layer.bias):
                expected = _rank(value) - 1 if layer.kind == "linear" else 1
                if axis != expected:
                    return f"its axis {axis} is not the input channel axis ({expected}) of {layer.label}"
                reason = _conv_refusal(user) if layer.kind == "conv" else None
                if reason:
                    return reason
                checked = _checked(editor, layer)
                if isinstance(checked, str):
                    return checked
                layers.append(checked)
                continue
            if name in IDENTITY and _is_identity(user):
                found = consumers_of(editor, user, axis, kinds)
            else:
                mapped = _axis_forward(user, axis)
                found = "" if mapped is None else consumers_of(editor, user, mapped, kinds)
            if isinstance(found, list):
                layers += found
                continue
            if found:
                return found
        return f"it is read by {name} ({user.name}), not by a {' or '.join(_KIND_NAMES[k] for k in kinds)}"
    if not layers:
        return "nothing reads it"
    return layers


def stored(editor: ir.ProgramEditor, node: Any) -> torch.Tensor | None:
    """The tensor behind a parameter placeholder, or None (absent, or computed in the graph)."""
    return editor.tensor(node) if isinstance(node, fx.Node) else None


def write_parameter(
    editor: ir.ProgramEditor, layer: Layer, index: int, value: torch.Tensor, readers: Iterable[fx.Node], fqn: str
) -> bool:
    """Make ``layer``'s argument ``index`` a parameter holding ``value``; return True if it untied one.

    The parameter is updated in place (a new tensor under the same key) when only ``readers`` read
    it; otherwise, and when the argument is absent (a Linear without a bias), a new parameter is
    added under ``fqn`` (made unique) and only ``layer`` reads it.
    """
    current = _arg(layer.node, index)
    if isinstance(current, fx.Node) and set(current.users) <= set(readers):
        editor.set_tensor(editor.fqn(current), value)
        return False
    node = editor.add_parameter(fresh_name(editor, fqn), value)
    args = list(layer.node.args) + [None] * max(0, index + 1 - len(layer.node.args))
    args[index] = node
    layer.node.args = tuple(args)
    return current is not None


def write_layer(editor: ir.ProgramEditor, layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> int:
    """Give ``layer`` its folded weight and bias (see :func:`write_parameter`); return how many were untied."""
    weight_fqn = editor.fqn(layer.weight) or ""
    untied = write_parameter(editor, layer, layer.weight_index, weight, [layer.node], f"{weight_fqn}_folded")
    if layer.bias is not None:
        bias_fqn = f"{editor.fqn(layer.bias)}_folded"
    else:
        owner = weight_fqn.rpartition(".")[0] or ir.meta.module_path(layer.node) or layer.node.name
        bias_fqn = f"{owner}.bias"
    untied += write_parameter(editor, layer, layer.bias_index, bias, [layer.node], bias_fqn)
    return int(untied)


def site_name(node: fx.Node) -> str:
    """The module a site node adapts (for diagnostics)."""
    return node.meta.get(ir.meta.PEFTC, {}).get("module") or ir.meta.module_path(node) or node.name


# ------------------------------------------------------------------------------------------------

_KIND_NAMES = {"linear": "Linear", "conv": "convolution", "norm": "normalization layer"}


def _layer(node: fx.Node, kinds: Sequence[str]) -> Layer | None:
    if node.op != "call_function":
        return None
    name = ir.target_name(node)
    if name == "aten.linear" and "linear" in kinds:
        return Layer(node, "linear", 1, 2)
    if name in CONV and "conv" in kinds:
        if name == "aten.convolution" and len(node.args) > 6 and node.args[6]:
            return None  # transposed: the weight is [d_in, d_out/groups, …]
        return Layer(node, "conv", 1, 2)
    if name in NORM and "norm" in kinds:
        return Layer(node, "norm", *NORM[name])
    return None


def _checked(editor: ir.ProgramEditor, layer: Layer) -> Layer | str:
    weight = layer.weight
    if weight is None:
        return f"{layer.label} has no affine weight"
    for role, node in (("weight", weight), ("bias", layer.bias)):
        if node is None:
            continue
        tensor = stored(editor, node)
        if tensor is None:
            return f"the {role} of {layer.label} is computed in the graph, not a stored parameter"
        if not tensor.dtype.is_floating_point:
            return f"the {role} of {layer.label} is {str(tensor.dtype).removeprefix('torch.')}, not floating point"
    return layer


def _conv_refusal(node: fx.Node) -> str | None:
    name = ir.target_name(node)
    args = list(node.args) + [None] * 9
    padding, groups = (args[4], args[8]) if name == "aten.convolution" else (args[4], args[6])
    if groups not in (None, 1):
        return f"{ir.target_name(node)} ({node.name}) is grouped (groups={groups})"
    zero = padding in (None, "valid") or (not isinstance(padding, str) and all(p == 0 for p in padding))
    if not zero:
        return (
            f"{ir.target_name(node)} ({node.name}) pads with zeros (padding={padding}): its border taps would "
            "see 0 where the shift puts β"
        )
    return None


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and ir.target_name(u) in SHAPE_ONLY)]


def _is_identity(node: fx.Node) -> bool:
    if ir.target_name(node) == "aten.dropout":
        return len(node.args) > 2 and node.args[2] is False  # eval mode
    return True


def _arg(node: fx.Node, index: int) -> Any:
    return node.args[index] if index < len(node.args) else None


def _rank(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _axis_backward(node: fx.Node, axis: int) -> int | None:
    """The axis of ``node``'s input that becomes ``axis`` of its output, for layout ops; else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name = ir.target_name(node)
    source = node.args[0]
    if name == "aten.permute":
        return int(node.args[1][axis]) % _rank(source)
    if name == "aten.transpose":
        a, b = (int(d) % _rank(source) for d in node.args[1:3])
        return b if axis == a else a if axis == b else axis
    if name in RESHAPE:
        return _same_axis(node.meta["val"].shape, source.meta["val"].shape, axis)
    return None


def _axis_forward(node: fx.Node, axis: int) -> int | None:
    """The axis of ``node``'s output that ``axis`` of its input becomes, for layout ops; else None."""
    if node.op != "call_function":
        return None
    name = ir.target_name(node)
    source = node.args[0]
    if name in IDENTITY and _is_identity(node):
        return axis
    if name == "aten.permute":
        return [int(d) % _rank(source) for d in node.args[1]].index(axis)
    if name == "aten.transpose":
        a, b = (int(d) % _rank(source) for d in node.args[1:3])
        return b if axis == a else a if axis == b else axis
    if name in RESHAPE:
        return _same_axis(source.meta["val"].shape, node.meta["val"].shape, axis)
    return None


def _same_axis(src: Sequence[Any], dst: Sequence[Any], axis: int) -> int | None:
    """The axis of ``dst`` holding exactly ``src``'s ``axis`` after a row-major reshape, or None.

    An axis survives a reshape whole when some ``dst`` axis has the same size and the same product of
    the sizes after it (then every element keeps its channel index).
    """
    size, tail = _expr(src[axis]), _product(src[axis + 1 :])
    for index in range(len(dst)):
        if _expr(dst[index]) == size and _product(dst[index + 1 :]) == tail:
            return index
    return None


def _expr(dim: Any) -> Any:
    import sympy

    return dim.node.expr if isinstance(dim, torch.SymInt) else sympy.Integer(int(dim))


def _product(dims: Sequence[Any]) -> Any:
    import sympy

    return sympy.expand(math.prod((_expr(d) for d in dims), start=sympy.Integer(1)))
