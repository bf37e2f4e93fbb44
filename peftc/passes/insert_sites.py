"""insert-sites: put every adapter site into the program, in stacking order.

For each site of each adapter (``peftc/ops.py`` describes the forms):

* **call site**: each call of the module (one tensor in, one tensor out) becomes one
  ``peftc::<op>(x, *base tensors, *adapter tensors, *scalars)`` node and the call's nodes are erased;
* **weight site**: inside each call of the module, the readers of the parameter get
  ``peftc::<op>(W, *base, *adapter tensors, *scalars)`` instead of ``W`` (``base``: the other
  parameters of the module the op reads, ``SiteOp.base_params``, as they are at that point). Readers outside the module (a tied
  weight) keep ``W``. A second adapter on the same parameter transforms the first one's output.
* **activation site**: at each call of the module, ``peftc::<op>(y, *adapter tensors, *scalars)`` is
  put on the call's output ``y`` (every reader outside the module reads it instead) or on its input
  (only the module's own nodes read it). Several activation sites on one side of a module apply in
  stacking order.

Adapters stack in the order given, as if each were merged before the next is applied: a module
adapted by several adapters takes every adapter's weight form (a call site cannot compose), so
multiplicative methods (DoRA, (IA)³, OFT) compose rather than add; a site on a parameter that a
later adapter replaces outright is overwritten, so it is dropped (reported); and an adapter trained
on a residual base must come before anything that adapts the same weight.
Adapter tensors become parameters named ``<module>.<role>.<adapter>`` (``<module>.<param>_<role>.<adapter>``
for raw parameters; ``<module>.input.<role>.<adapter>`` for an activation site on a module's input;
``<role>.<adapter>`` for a tensor shared by every site, such as VeRA's projections),
annotated with their source ``file:key``; a module called several times shares them. Refusals raise,
naming the site: an adapter that cannot be inserted would silently compute the base model. After the
pass, every site op's eager body is the reference semantics of the adapted model.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch import fx

from peftc import ir
from peftc.errors import PreconditionError, UnsupportedError
from peftc.ir.modules import ModuleCall, ModuleInfo, ModuleTable
from peftc.methods import registry
from peftc.methods.base import Adapter, Site
from peftc.passes.base import Diagnostic, PassBase, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class InsertSitesOptions:
    adapters: tuple[Adapter, ...]
    """The adapters to insert, in stacking order."""


class InsertSitesPass(PassBase):
    """Insert every adapter's sites (call sites, or weight sites where adapters stack)."""

    name = "insert-sites"

    def __init__(self, adapters: tuple[Adapter, ...]) -> None:
        self.options = InsertSitesOptions(tuple(adapters))

    def plan(self) -> tuple[list[tuple[Adapter, Site]], list[Diagnostic]]:
        """Sites in insertion order, and what stacking changed (see the module docstring).

        A call site on a module that several adapters adapt is replaced by its weight form. A site on
        a parameter that a *later* adapter replaces outright (``modules_to_save``, LN tuning) is
        dropped: applied in order, the replacement overwrites it.
        """
        adapters = self.options.adapters
        last_replaced = {r.param: i for i, a in enumerate(adapters) for r in a.replacements}
        owners = Counter(
            s.module for a in adapters for s in {x.module: x for x in a.sites if not _is_activation(x)}.values()
        )
        planned: list[tuple[Adapter, Site]] = []
        notes: list[Diagnostic] = []
        for index, adapter in enumerate(adapters):
            _check_residuals(adapters, index)
            for site in adapter.sites:
                # An activation site transforms what flows in or out, never a parameter.
                touched = set() if _is_activation(site) else {site.param} if site.param else {"weight", "bias"}
                overridden = {p for p in touched if last_replaced.get(f"{site.module}.{p}", -1) > index}
                forms = [site]
                if registry.site_ops()[site.op].form == "call" and (owners[site.module] > 1 or overridden):
                    if not site.weight_form:
                        raise UnsupportedError(
                            f"adapter {adapter.name!r}: module {site.module!r} is adapted by several adapters, but "
                            f"{site.op} has no weight form to stack"
                        )
                    forms = list(site.weight_form)
                for form in forms:
                    if form.param in overridden:
                        later = adapters[last_replaced[f"{site.module}.{form.param}"]].name
                        notes.append(
                            Diagnostic(
                                site.module,
                                f"{adapter.name}'s {form.op} on {form.param} is overwritten by {later}'s full tensor",
                            )
                        )
                        continue
                    planned.append((adapter, form))
        for module, count in sorted(owners.items()):
            if count > 1:
                order = [a.name for a in adapters if any(s.module == module for s in a.sites)]
                notes.append(Diagnostic(module, "composed in order: " + " → ".join(order), kind="info"))
        return planned, notes

    def requires(self, program: ir.Program) -> None:
        modules = {site.module for _, site in self.plan()[0]}
        for node in program.graph.nodes:
            module = node.meta.get(ir.meta.PEFTC, {}).get("module") if node.op == "call_function" else None
            if module in modules:
                raise PreconditionError(f"module {module!r} already has a site node ({node.name})")

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        table = ir.module_table(program)
        editor = ir.ProgramEditor(program, self.name)
        inserted = 0
        planned, notes = self.plan()
        for adapter, site in planned:
            if registry.site_ops()[site.op].form == "call":
                inserted += _insert_call_site(editor, table, adapter, site)
            elif _is_activation(site):
                inserted += _insert_activation_site(editor, table, adapter, site)
            else:
                inserted += _insert_weight_site(editor, table, adapter, site)
        new = editor.finish() if inserted else program
        stats = {
            "sites": inserted,
            "stacked": sum(d.kind == "info" for d in notes),
            "overwritten": sum(d.kind == "skipped" for d in notes),
        }
        return PassResult(new, modified=inserted > 0, stats=stats, diagnostics=tuple(notes))

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        planned = {(a.name, s.module, s.op) for a, s in self.plan()[0]}
        call_modules = {m for _, m, op in planned if registry.site_ops()[op].form == "call"}
        seen = set()
        for node in program.graph.nodes:
            if node.op != "call_function":
                continue
            info = node.meta.get(ir.meta.PEFTC, {})
            key = (info.get("adapter"), info.get("module"), info.get("site"))
            if key in planned:
                seen.add(key)
            elif ir.meta.module_path(node) in call_modules:
                raise AssertionError(
                    f"{node.name} ({node.target}) still computes adapted module {ir.meta.module_path(node)}"
                )
        missing = planned - seen
        if missing:
            raise AssertionError(f"no site node for {sorted(missing)[0]}")


def _adapts(adapter: Adapter, module: str) -> bool:
    """Whether ``adapter`` has a site on ``module`` or replaces one of its parameters."""
    return any(s.module == module for s in adapter.sites) or any(
        r.param.rpartition(".")[0] == module for r in adapter.replacements
    )


def _check_residuals(adapters: tuple[Adapter, ...], index: int) -> None:
    """A residual base (PiSSA/OLoRA) is rebuilt from the original weight, so nothing may adapt that
    weight before the adapter that needs it; nor before a site whose tensors the parser derived from
    the base weight (``Site.info["base_weight_derived"]``: PEFT would derive them from the weight the
    earlier adapters leave)."""
    adapter = adapters[index]
    for site in adapter.sites:
        why = site.info.get("base_weight_derived")
        earlier = next((a for a in adapters[:index] if _adapts(a, site.module)), None)
        if why and earlier is not None:
            raise UnsupportedError(
                f"adapter {adapter.name!r} on {site.module!r}: {why}, but {earlier.name!r} adapts that module before "
                f"it; put {adapter.name!r} first"
            )
    for replacement in adapter.replacements:
        if "residual base" not in replacement.reason:
            continue
        module = replacement.param.rpartition(".")[0]
        for earlier in adapters[:index]:
            if any(s.module == module for s in earlier.sites) or any(
                r.param == replacement.param for r in earlier.replacements
            ):
                raise UnsupportedError(
                    f"adapter {adapter.name!r} was trained on a residual base of {module!r} rebuilt from the original "
                    f"weight, but {earlier.name!r} adapts that weight before it; put {adapter.name!r} first, or convert it "
                    "with PEFT's path_initial_model_for_weight_conversion"
                )


def _adapter_tensors(editor: ir.ProgramEditor, adapter: Adapter, site: Site) -> list[fx.Node | None]:
    nodes: list[fx.Node | None] = []
    for role in registry.site_ops()[site.op].tensor_roles:
        entry = site.tensors.get(role)
        if entry is None:
            nodes.append(None)
            continue
        # Sites on raw parameters (target_parameters) of one module need the parameter in the name.
        owner = site.module if site.param in (None, "weight", "bias") else f"{site.module}.{site.param}_"
        if site.position == "input":  # a module may carry activation sites on both sides
            owner = f"{site.module}.input"
        fqn = f"{role}.{adapter.name}" if entry.shared else f"{owner}.{role}.{adapter.name}".replace("_.", "_")
        node = editor.node_for(fqn) or editor.add_parameter(
            fqn, entry.tensor, adapter=adapter.name, source=adapter.source.describe(entry.key), role=role
        )
        nodes.append(node)
    return nodes


def _insert_call_site(editor: ir.ProgramEditor, table: ModuleTable, adapter: Adapter, site: Site) -> int:
    op = registry.site_ops()[site.op]
    module = table[site.module]
    tensors = _adapter_tensors(editor, adapter, site)
    scalars = tuple(site.scalars[name] for name in op.scalars)
    for call in module.calls:
        x, output = _single_io(call, site, adapter)
        # Nodes are looked up by name: the editor works on a copy of the graph the table describes.
        nodes = {n.name: n for n in editor.graph.nodes}
        region = [nodes[n.name] for n in call.nodes]
        base = []
        for local in op.base_params:
            operand, _ = _operand(editor, module, local, region, adapter) if local in module.params else (None, [])
            base.append(operand)
        out_node = nodes[output.name]
        extra = [_index_input(editor, name, nodes[x.name], site) for name in op.user_inputs]
        # Inserted just before the call's output, every operand is already defined.
        node = editor.call(op.overload, (nodes[x.name], *base, *tensors, *scalars, *extra), like=out_node)
        ir.meta.peftc_meta(node).update(adapter=adapter.name, module=site.module, site=site.op)
        editor.replace(out_node, node, region)
    return len(module.calls)


def _index_input(editor: ir.ProgramEditor, name: str, x: fx.Node, site: Site) -> fx.Node:
    """The per-row index input ``name`` (``[batch]`` int64), created on first use.

    Every site that reads it must see the batch as the first dim of its input, the same dim.
    """
    batch = x.meta["val"].shape[0]
    existing = editor.user_input(name)
    if existing is None:
        with editor.fake_mode:
            like = torch.empty((batch,), dtype=torch.int64)
        if isinstance(batch, int):
            raise UnsupportedError(
                f"module {site.module!r}: its input's first dim is the fixed size {batch}, not a dynamic batch dim; "
                "mixed-adapter batches need the batch first on every adapted module's input"
            )
        return editor.add_user_input(name, like)
    if str(existing.meta["val"].shape[0]) != str(batch):
        raise UnsupportedError(
            f"module {site.module!r}: its input's first dim is {batch}, not the batch dim "
            f"{existing.meta['val'].shape[0]}; mixed-adapter batches need the batch first on every adapted module's input"
        )
    return existing


def _insert_weight_site(editor: ir.ProgramEditor, table: ModuleTable, adapter: Adapter, site: Site) -> int:
    op = registry.site_ops()[site.op]
    module = table[site.module]
    tensors = _adapter_tensors(editor, adapter, site)
    scalars = tuple(site.scalars[name] for name in op.scalars)
    for call in module.calls:
        nodes = {n.name: n for n in editor.graph.nodes}
        region = [nodes[n.name] for n in call.nodes]
        operand, readers = _operand(editor, module, site.param, region, adapter)
        # Other parameters the transform reads, as they are before this site (see SiteOp.base_params).
        base = [
            _operand(editor, module, local, region, adapter)[0] if local in module.params else None
            for local in op.base_params
        ]
        node = editor.call(op.overload, (operand, *base, *tensors, *scalars), like=readers[0])
        ir.meta.peftc_meta(node).update(
            adapter=adapter.name, module=site.module, site=site.op, param=module.params[site.param]
        )
        for reader in readers:
            for arg in set(reader.all_input_nodes) & {operand, *_stale(operand, editor)}:
                reader.replace_input_with(arg, node)
    return len(module.calls)


def _is_activation(site: Site) -> bool:
    return registry.site_ops()[site.op].form == "activation"


def _insert_activation_site(editor: ir.ProgramEditor, table: ModuleTable, adapter: Adapter, site: Site) -> int:
    op = registry.site_ops()[site.op]
    module = table[site.module]
    tensors = _adapter_tensors(editor, adapter, site)
    scalars = tuple(site.scalars[name] for name in op.scalars)
    for call in module.calls:
        nodes = {n.name: n for n in editor.graph.nodes}
        region = {nodes[n.name] for n in call.nodes if n.name in nodes}
        if site.position == "output":
            ends = [nodes[n.name] for n in call.outputs if ir.meta.is_tensor_node(n) and n.name in nodes]
        else:  # what the call reads now, which an earlier activation site may have put in front of it
            ends = list(
                dict.fromkeys(
                    a
                    for n in editor.graph.nodes
                    if n in region
                    for a in n.all_input_nodes
                    if a not in region and ir.meta.is_tensor_node(a) and editor.fqn(a) is None
                )
            )
        if len(ends) != 1:
            raise UnsupportedError(
                f"adapter {adapter.name!r}: module {site.module!r} has {len(ends)} tensor {site.position}s in the "
                f"graph (or they were replaced by another site); {site.op} needs exactly one"
            )
        if site.position == "output":
            value = _latest(ends[0], site)
            readers = [u for u in value.users if u not in region]
            node = editor.call(op.overload, (value, *tensors, *scalars), like=value, before=value.next)
        else:
            value = ends[0]
            readers = [n for n in editor.graph.nodes if n in region and value in n.all_input_nodes]
            node = editor.call(op.overload, (value, *tensors, *scalars), like=readers[0])
        ir.meta.peftc_meta(node).update(adapter=adapter.name, module=site.module, site=site.op, position=site.position)
        for reader in readers:
            reader.replace_input_with(value, node)
    return len(module.calls)


def _latest(value: fx.Node, site: Site) -> fx.Node:
    """The module's output after the activation sites already stacked on it."""
    while True:
        stacked = [
            u
            for u in value.users
            if u.meta.get(ir.meta.PEFTC, {}).get("module") == site.module
            and u.meta.get(ir.meta.PEFTC, {}).get("position") == "output"
        ]
        if not stacked:
            return value
        value = stacked[0]


def _operand(
    editor: ir.ProgramEditor, module: ModuleInfo, local: str, region: list[fx.Node], adapter: Adapter
) -> tuple[fx.Node, list[fx.Node]]:
    """The current value of the module's parameter ``local`` as its call reads it, and its readers.

    That is the parameter's placeholder (export may route a tied parameter through another name:
    the module's own is preferred) or, when adapters stack, the last weight site on it. The call must
    read it directly: a weight computed in the graph (a parametrization) would be silently replaced
    by the stored one, so it is refused.
    """
    fqn = module.params[local]
    own = editor.node_for(fqn)
    tensor = editor.tensor(own)
    current = {own, *_stale(own, editor)}
    readers, operand = [], None
    for node in region:
        for arg in node.all_input_nodes:
            stacked = arg.meta.get(ir.meta.PEFTC, {}).get("param") == fqn
            if arg in current or stacked or (arg.op == "placeholder" and editor.tensor(arg) is tensor):
                operand = arg if stacked else own
                readers.append(node)
    if operand is None:
        raise UnsupportedError(
            f"adapter {adapter.name!r}: module {module.path!r} does not read its parameter {local!r} directly "
            "(is it computed, e.g. by a parametrization?); peftc cannot adapt it"
        )
    return operand, readers


def _stale(own: fx.Node, editor: ir.ProgramEditor) -> set[fx.Node]:
    """Other placeholders holding the same tensor (tied names export routed the call through).

    None for a node that holds no stored tensor (a weight site an earlier adapter stacked): user
    inputs hold none either, and must not be taken for it.
    """
    tensor = editor.tensor(own)
    if tensor is None:
        return set()
    return {n for n in editor.graph.nodes if n.op == "placeholder" and n is not own and editor.tensor(n) is tensor}


def _single_io(call: ModuleCall, site: Site, adapter: Adapter) -> tuple[fx.Node, fx.Node]:
    if len(call.inputs) != 1 or len(call.outputs) != 1:
        raise UnsupportedError(
            f"adapter {adapter.name!r}: module {site.module!r} is called with {len(call.inputs)} tensor "
            f"inputs and {len(call.outputs)} outputs in the graph; a site needs exactly one of each"
        )
    return call.inputs[0], call.outputs[0]
