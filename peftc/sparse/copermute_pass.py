"""co-permute: permute the base by a :class:`~peftc.sparse.copermute.Plan` and turn S²FT sites into slices.

Every parameter the plan names (q/k/v rows and o columns of an attention block, with q/k/v biases;
gate/up rows and down columns of an MLP block, with gate/up biases) becomes a new tensor in the new
order, under the same key. Each ``s2ft_linear`` site then has its indices mapped to the new order; its
block is reordered to match (a new parameter ``<module>.s2ft_slice_block.<adapter>``; its other
dimension too where the plan orders it: an ``o_proj`` rows site spans the heads) and, where the
indices form one range ``[start, start + k)`` — everything the plan permutes — the site becomes
``s2ft_slice_linear`` (no gather, no scatter). A site whose indices stay scattered (a dimension the
plan keeps: o rows, q columns…) stays a gather, with a diagnostic.

The same pass on the base program alone (no sites) is the permuted base, which the ``co-permute``
mode checks against the original before it runs the pass on the adapted program. A permuted
parameter may only be read by ``aten.linear`` or an S²FT site: anything else (another adapter's site
on that module, a tied weight) is refused, since it would read the new order without knowing it.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc import ir
from peftc.errors import PassError, UnsupportedError
from peftc.methods.s2ft import S2FT_LINEAR, S2FT_SLICE_LINEAR
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult
from peftc.sparse.copermute import Plan, Selection, new_positions

LINEAR = torch.ops.aten.linear.default


@dataclasses.dataclass(frozen=True)
class CoPermuteOptions:
    """The blocks the plan permutes (the orders themselves are in the manifest's ``co_permute``)."""

    attention: tuple[str, ...]
    mlp: tuple[str, ...]


def selections(program: ir.Program) -> list[Selection]:
    """The indices of every ``s2ft_linear`` site of ``program``."""
    out = []
    for node in _sites(program.graph):
        module = node.meta.get(ir.meta.PEFTC, {}).get("module", node.name)
        indices = ir.state_tensor(program, node.args[3])
        out.append(Selection(module, int(node.args[5]), tuple(int(i) for i in indices.tolist())))
    return out


def _sites(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is S2FT_LINEAR.overload]


class CoPermutePass(PassBase):
    """Permute the base once; S²FT sites become slices (module docstring)."""

    name = "co-permute"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.options = CoPermuteOptions(tuple(plan.attention), tuple(plan.mlp))

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        permuted = 0
        for key, (dim, order) in self.plan.orders().items():
            node = editor.node_for(key)
            if node is None:
                continue
            _only_linear_reads(key, node)
            editor.set_tensor(key, editor.tensor(node).index_select(dim, order))
            permuted += 1
        sliced, diagnostics = 0, []
        for node in _sites(editor.graph):
            done = self._rewrite(editor, node)
            sliced += done
            if not done:
                module = node.meta.get(ir.meta.PEFTC, {}).get("module", node.name)
                diagnostics.append(Diagnostic(module, "indices not one contiguous range: kept as a gather"))
        if not permuted and not sliced:
            return PassResult(program, False, {"permuted": 0, "sliced": 0}, tuple(diagnostics))
        editor.remove_unused_state()
        return PassResult(editor.finish(), True, {"permuted": permuted, "sliced": sliced}, tuple(diagnostics))

    def _rewrite(self, editor: ir.ProgramEditor, node) -> bool:
        """One site in the new order: indices mapped where the plan orders their dimension, the block's
        other dimension reordered where the plan orders that one (o rows span the heads, q columns the
        hidden state…); a slice where the indices form one range (True), else still a gather."""
        x, weight, bias, indices_node, block_node, dim = node.args
        info = dict(node.meta.get(ir.meta.PEFTC, {}))
        module = info.get("module", "")
        indices, block = editor.tensor(indices_node), editor.tensor(block_node)
        order, across = self.plan.order_for(module, dim), self.plan.order_for(module, 1 - dim)
        positions = indices if order is None else new_positions(order, indices)
        sort = positions.argsort()
        positions, block = positions[sort], block.index_select(dim, sort)
        block = block if across is None else block.index_select(1 - dim, across)
        start, k = int(positions[0]), positions.numel()
        sliced = torch.equal(positions, torch.arange(start, start + k))
        if order is not None and not sliced:
            raise PassError(f"{module}: the plan left its S²FT indices in {k} scattered places")
        if order is None and across is None and not sliced:
            return False
        new_block = self._added(editor, block_node, ".s2ft_slice_block.", block.contiguous(), info)
        if sliced:
            new = editor.call(S2FT_SLICE_LINEAR.overload, (x, weight, bias, new_block, start, dim), like=node)
        else:
            new_indices = self._added(editor, indices_node, ".s2ft_permuted_indices.", positions, info)
            new = editor.call(S2FT_LINEAR.overload, (x, weight, bias, new_indices, new_block, dim), like=node)
        ir.meta.peftc_meta(new).update({k: v for k, v in info.items() if k != "from_pass"})
        ir.meta.peftc_meta(new).update(site=S2FT_SLICE_LINEAR.name if sliced else S2FT_LINEAR.name)
        editor.replace(node, new)
        return sliced

    @staticmethod
    def _added(editor: ir.ProgramEditor, like, infix: str, tensor: torch.Tensor, info) -> object:
        """``tensor`` as a new parameter named after ``like``'s (its role replaced by ``infix``)."""
        fqn = editor.fqn(like)
        role = fqn.rsplit(".", 2)[-2]
        source = like.meta.get(ir.meta.PEFTC, {}).get("source", fqn)
        return editor.add_parameter(
            fqn.replace(f".{role}.", infix, 1),
            tensor,
            adapter=info.get("adapter"),
            source=f"{source} (reordered by co-permute)",
            role=role,
        )


def _only_linear_reads(key: str, node) -> None:
    for user in node.users:
        as_weight_or_bias = node in user.args[1:3] and node not in (user.args[0], *user.args[3:])
        if user.target in (LINEAR, S2FT_LINEAR.overload) and as_weight_or_bias:
            continue
        raise UnsupportedError(
            f"--co-permute: {key} is read by {ir.target_name(user)} (another adapter's site on a co-permuted module, "
            "or a shared weight); co-permutation handles S²FT sites only: compile without --co-permute"
        )
