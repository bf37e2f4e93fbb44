"""insert-sites: replace each adapted module call by one ``peftc::`` site node.

For every site of every adapter:

1. find the module's calls in the graph (``peftc.ir.module_table``); each call must have one tensor
   input and one output;
2. add the adapter's tensors as parameters named ``<module>.<role>.<adapter>`` (e.g.
   ``encoder.layer.0.attention.self.query.lora_A.default``), annotated with their source
   ``file:key``; a module called several times shares them;
3. insert ``peftc::<op>(x, *base tensors, *adapter tensors, *scalars)`` (see ``peftc/ops/base.py``)
   and erase the call's nodes.

Refusals raise, naming the site: an adapter that cannot be inserted would silently compute the base
model. After the pass every site op's eager body is the reference semantics of the adapted model.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from peftc import ir
from peftc.errors import PreconditionError, UnsupportedError
from peftc.ir.modules import ModuleCall, ModuleInfo, ModuleTable
from peftc.methods.base import Adapter, Site
from peftc.ops import SITE_OPS
from peftc.passes.base import PassBase, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class InsertSitesOptions:
    adapters: tuple[Adapter, ...]
    """The adapters to insert, in stacking order."""


class InsertSitesPass(PassBase):
    """Insert one site node per adapted module call."""

    name = "insert-sites"

    def __init__(self, adapters: tuple[Adapter, ...]) -> None:
        self.options = InsertSitesOptions(tuple(adapters))

    def requires(self, program: ir.Program) -> None:
        owners: dict[str, str] = {}
        for adapter in self.options.adapters:
            for site in adapter.sites:
                if site.module in owners:
                    raise UnsupportedError(
                        f"adapters {owners[site.module]!r} and {adapter.name!r} both adapt module "
                        f"{site.module!r}; stacking adapters on one module is not supported yet"
                    )
                owners[site.module] = adapter.name
        for node in program.graph.nodes:
            module = node.meta.get(ir.meta.PEFTC, {}).get("module") if node.op == "call_function" else None
            if module in owners:
                raise PreconditionError(f"module {module!r} already has a site node ({node.name})")

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        table = ir.module_table(program)
        editor = ir.ProgramEditor(program, self.name)
        inserted = 0
        for adapter in self.options.adapters:
            for site in adapter.sites:
                inserted += _insert_site(editor, table, adapter, site)
        new = editor.finish() if inserted else program
        return PassResult(new, modified=inserted > 0, stats={"sites": inserted})

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        # Every node that executes inside an adapted module is now that module's site node.
        sites = {(a.name, s.module): s.op for a in self.options.adapters for s in a.sites}
        seen = set()
        for node in program.graph.nodes:
            info = node.meta.get(ir.meta.PEFTC, {}) if node.op == "call_function" else {}
            key = (info.get("adapter"), info.get("module"))
            if key in sites:
                seen.add(key)
            elif node.op == "call_function" and ir.meta.module_path(node) in {m for _, m in sites}:
                raise AssertionError(
                    f"{node.name} ({node.target}) still computes adapted module {ir.meta.module_path(node)}"
                )
        missing = set(sites) - seen
        if missing:
            raise AssertionError(f"no site node for {sorted(missing)[0]}")


def _insert_site(editor: ir.ProgramEditor, table: ModuleTable, adapter: Adapter, site: Site) -> int:
    op = SITE_OPS[site.op]
    module = table[site.module]
    tensors = []
    for role in op.tensor_roles:
        entry = site.tensors.get(role)
        if entry is None:
            tensors.append(None)
            continue
        fqn = f"{site.module}.{role}.{adapter.name}"
        node = editor.node_for(fqn) or editor.add_parameter(
            fqn,
            entry.tensor,
            adapter=adapter.name,
            source=adapter.source.describe(entry.key),
            role=role,
        )
        tensors.append(node)
    scalars = tuple(site.scalars[name] for name in op.scalars)
    for call in module.calls:
        x, output = _single_io(call, site, adapter)
        # Nodes are looked up by name: the editor works on a copy of the graph the table describes.
        nodes = {n.name: n for n in editor.graph.nodes}
        region = [nodes[n.name] for n in call.nodes]
        base = [_base_operand(editor, module, local, region, adapter) for local in op.base_params]
        out_node = nodes[output.name]
        # Inserted just before the call's output, every operand is already defined.
        node = editor.call(op.overload, (nodes[x.name], *base, *tensors, *scalars), like=out_node)
        ir.meta.peftc_meta(node).update(adapter=adapter.name, module=site.module, site=site.op)
        editor.replace(out_node, node, region)
    return len(module.calls)


def _base_operand(editor: ir.ProgramEditor, module: ModuleInfo, local: str, region: list[fx.Node], adapter: Adapter):
    """The placeholder holding the module's parameter ``local`` as the call reads it (None if absent).

    The call must read the parameter itself: a weight computed in the graph (a parametrization)
    would be silently replaced by the stored one, so it is refused.
    """
    fqn = module.params.get(local)
    if fqn is None:
        return None
    own = editor.node_for(fqn)
    tensor = editor.tensor(own)
    read = [a for n in region for a in n.all_input_nodes if a.op == "placeholder" and editor.tensor(a) is tensor]
    if not read:
        raise UnsupportedError(
            f"adapter {adapter.name!r}: module {module.path!r} does not read its parameter {local!r} directly "
            "(is it computed, e.g. by a parametrization?); peftc cannot adapt it"
        )
    # Prefer the module's own placeholder: export may route tied parameters through another name.
    return own if own in read or not own.users else read[0]


def _single_io(call: ModuleCall, site: Site, adapter: Adapter):
    if len(call.inputs) != 1 or len(call.outputs) != 1:
        raise UnsupportedError(
            f"adapter {adapter.name!r}: module {site.module!r} is called with {len(call.inputs)} tensor "
            f"inputs and {len(call.outputs)} outputs in the graph; a site needs exactly one of each"
        )
    return call.inputs[0], call.outputs[0]
