"""sparsify-deft: apply the DEFT rewrites the density search chose to a merged program.

The search (``peftc/density/compiled.py``, reusing ``peftc/density/exploit.py`` on the eager merged
model) decides; this pass only rewrites, per MLP block of its plan:

1. *prune* (``keep``: the neurons that stay): the up (and gate) projections' ``aten.linear`` get their
   weight rows and bias entries ``keep``, the down projection's its weight columns ``keep``; every node
   between them (the activation, a gated MLP's product) is rebuilt on the narrower values, so the
   fake values and the lowered graph carry the new width. Removing a neuron whose activation is 0 is
   exact: its down column multiplies 0. With ``means`` (a smooth activation's neurons, each one's mean
   down-projection input), the removed neurons' mean contribution is folded into the down bias
   (``modules.folded_bias``; dropped where the down projection has none).
2. *skip* (``keep`` empty, or the block skipped): the down projection's output becomes its bias
   broadcast over the MLP input's rows (``zeros_like(x) + b``); the up projections and the activation
   are then dead code and go, with their weights.

New weights are new parameters (``<module>.weight_pruned``…), so a weight shared with another reader
is never changed under it. Refused (``UnsupportedError``, naming the module): a module of the plan not
called exactly once as one ``aten.linear``; an intermediate value read outside its block; a skipped
block whose output width differs from its input's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import fx

from peftc import ir
from peftc.density.modules import folded_bias
from peftc.errors import UnsupportedError
from peftc.passes.base import PassBase, PassContext, PassResult, fresh_name

LINEAR = torch.ops.aten.linear.default


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One MLP block's rewrite: the modules by path and the neurons kept (empty: the block is skipped)."""

    name: str
    """The activation's module path (the density report's layer name)."""
    ups: tuple[str, ...]
    down: str
    keep: tuple[int, ...]
    means: tuple[float, ...] = ()
    """Per neuron, its mean down-projection input, folded into the bias when it is removed (empty: none)."""


@dataclasses.dataclass(frozen=True)
class SparsifyDeftOptions:
    blocks: tuple[BlockPlan, ...]


class SparsifyDeftPass(PassBase):
    """Slice pruned neurons out of MLP blocks and replace skipped blocks by their bias (module docstring)."""

    name = "sparsify-deft"

    def __init__(self, blocks: Sequence[BlockPlan]) -> None:
        self.options = SparsifyDeftOptions(tuple(blocks))

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        if not self.options.blocks:
            return PassResult(program, False, {"pruned": 0, "skipped": 0, "neurons_removed": 0})
        editor = ir.ProgramEditor(program, self.name)
        pruned = skipped = removed = 0
        for block in self.options.blocks:
            ups = [_linear(editor, path) for path in block.ups]
            down = _linear(editor, block.down)
            width = int(_state(editor, down, 1, block.down).shape[1])
            removed += width - len(block.keep)
            if block.keep:
                _prune(editor, block, ups, down)
                pruned += 1
            else:
                _skip(editor, block, ups, down)
                skipped += 1
        editor.eliminate_dead_code()
        editor.remove_unused_state()
        stats = {"pruned": pruned, "skipped": skipped, "neurons_removed": removed}
        return PassResult(editor.finish(), True, stats)


def _linear(editor: ir.ProgramEditor, path: str) -> fx.Node:
    """The one ``aten.linear`` node of module ``path``'s one call."""
    nodes = [
        n
        for n in editor.graph.nodes
        if n.op == "call_function" and n.target is LINEAR and ir.meta.module_path(n) == path
    ]
    if len(nodes) != 1:
        raise UnsupportedError(
            f"{path}: the density passes rewrite a module computed by exactly one aten.linear; found {len(nodes)}"
        )
    return nodes[0]


def _parameter(editor: ir.ProgramEditor, module: str, role: str, value: torch.Tensor) -> fx.Node:
    return editor.add_parameter(fresh_name(editor, f"{module}.{role}_pruned"), value.contiguous())


def _state(editor: ir.ProgramEditor, node: fx.Node, index: int, module: str) -> torch.Tensor:
    """The tensor behind argument ``index`` of the linear ``node`` of ``module``: a parameter, not a computed value."""
    value = editor.tensor(node.args[index])
    if value is None:
        raise UnsupportedError(f"{module}: its {('input', 'weight', 'bias')[index]} is computed in the graph")
    return value


def _region(block: BlockPlan, ups: Sequence[fx.Node], down: fx.Node) -> list[fx.Node]:
    """The nodes from the up projections to the down projection's input, in graph order."""
    region: list[fx.Node] = []
    frontier = list(ups)
    while frontier:
        node = frontier.pop()
        if node in region:
            continue
        region.append(node)
        for user in node.users:
            if user is down:
                continue
            if user.op == "output":
                raise UnsupportedError(f"{block.name}: an MLP intermediate value is a program output")
            frontier.append(user)
    if down.args[0] not in region:
        raise UnsupportedError(f"{block.down}: its input is not computed from {', '.join(block.ups)}")
    order = {n: i for i, n in enumerate(down.graph.nodes)}
    if any(order[n] > order[down] for n in region):
        raise UnsupportedError(f"{block.name}: an MLP intermediate value is read after {block.down}")
    return sorted(region, key=order.__getitem__)


def _prune(editor: ir.ProgramEditor, block: BlockPlan, ups: Sequence[fx.Node], down: fx.Node) -> None:
    keep = torch.tensor(block.keep, dtype=torch.long)
    region = _region(block, ups, down)
    new: dict[fx.Node, fx.Node] = {}
    for node in region:
        if node.kwargs:
            raise UnsupportedError(f"{block.name}: {node.target} with keyword arguments between the MLP projections")
        if node in ups:
            path = block.ups[list(ups).index(node)]
            weight = _parameter(editor, path, "weight", _state(editor, node, 1, path).index_select(0, keep))
            bias = node.args[2] if len(node.args) > 2 else None
            args: tuple = (node.args[0], weight)
            if bias is not None:
                args += (_parameter(editor, path, "bias", _state(editor, node, 2, path).index_select(0, keep)),)
        else:
            args = fx.node.map_arg(node.args, lambda a: new.get(a, a))
        new[node] = editor.call(node.target, args, like=node, before=down)
    dense = _state(editor, down, 1, block.down)
    weight = _parameter(editor, block.down, "weight", dense.index_select(1, keep))
    args = (new[down.args[0]], weight, *down.args[2:])
    if block.means and len(args) > 2 and args[2] is not None:
        removed = torch.tensor(sorted(set(range(dense.shape[1])) - set(block.keep)), dtype=torch.long)
        bias = folded_bias(dense, _state(editor, down, 2, block.down), removed, torch.tensor(block.means))
        args = (*args[:2], _parameter(editor, block.down, "bias", bias), *args[3:])
    editor.replace(down, editor.call(LINEAR, args, like=down), region)


def _skip(editor: ir.ProgramEditor, block: BlockPlan, ups: Sequence[fx.Node], down: fx.Node) -> None:
    x = ups[0].args[0]
    width = int(_state(editor, down, 1, block.down).shape[0])
    if x.meta["val"].shape[-1] != width:
        raise UnsupportedError(
            f"{block.name}: skipping needs the MLP's input width ({x.meta['val'].shape[-1]}) to equal its output's "
            f"({width})"
        )
    zeros = editor.call(torch.ops.aten.zeros_like.default, (x,), like=down)
    bias = down.args[2] if len(down.args) > 2 else None
    out = zeros if bias is None else editor.call(torch.ops.aten.add.Tensor, (zeros, bias), like=down)
    editor.replace(down, out)
