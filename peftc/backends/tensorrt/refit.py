"""The refit map: which engine weight each adapter tensor becomes, and how to recompute it.

A TensorRT engine built from ONNX names its refittable weights after the ONNX initializers, and
peftc names initializers after state-dict keys. So for every weight an adapter touches the chain is

    adapter safetensors key  →  FX site (peftc:: op on a module)  →  ONNX initializer  →  TensorRT weight

and it is built here from peftc's own names, never by matching names with regexes afterwards. Two
kinds of entry:

* ``adapter`` (unmerged artifacts): the initializer *is* an adapter tensor (``<module>.lora_A.<name>``);
  the new value is the new adapter's tensor under the same key.
* ``merged``: the initializer is a base weight with sites folded in. The new value is recomputed from
  the **base** weight (stored in ``refit_base.safetensors`` when the engine is refittable) and the new
  adapter's tensors, through the same ``peftc::`` ops the merge pass used: ``W' = opₙ(…op₁(W, …)…)``.
  It never starts from the previous adapter's merged weight, so swapping A → B → A gives A's weights
  back exactly.

Weights the map cannot recompute (a tied weight merged into a ``<key>_merged`` copy, a tensor
derived at compile time such as DoRA's factored norm, an operand computed in the graph) are listed
in ``refused`` with the reason; refitting an artifact that has any is refused.

Nothing here imports TensorRT: the map and the recomputation are tested on CPU, by feeding the
recomputed weights to onnxruntime as initializer overrides (``tests/backends/test_tensorrt.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx

from peftc import ir
from peftc.errors import InputError
from peftc.methods import registry
from peftc.ops import SiteOp

BASE_FILE = "refit_base.safetensors"


@dataclasses.dataclass(frozen=True)
class RefitSite:
    """One site applied to a weight: ``W ← op(W, *tensors, *scalars)``."""

    op: str
    module: str
    adapter: str
    tensors: tuple[str | None, ...]
    """The adapter tensors in the op's role order, as ``file:key`` (None for an absent optional one)."""
    scalars: tuple[Any, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "module": self.module,
            "adapter": self.adapter,
            "tensors": list(self.tensors),
            "scalars": list(self.scalars),
        }


@dataclasses.dataclass(frozen=True)
class RefitEntry:
    """One refittable TensorRT weight."""

    weight: str
    """TensorRT weight name = ONNX initializer name = state-dict key."""
    kind: str
    """``adapter`` or ``merged``."""
    shape: tuple[int, ...]
    dtype: str
    source: str | None = None
    """``adapter``: the ``file:key`` it holds."""
    sites: tuple[RefitSite, ...] = ()
    """``merged``: the sites folded into it, innermost first."""
    adapter: str | None = None
    """``adapter``: the name of the adapter it belongs to."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weight": self.weight, "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.source is not None:
            out["source"] = self.source
            out["adapter"] = self.adapter
        if self.sites:
            out["sites"] = [s.to_json() for s in self.sites]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RefitEntry:
        sites = tuple(
            RefitSite(s["op"], s["module"], s["adapter"], tuple(s["tensors"]), tuple(s["scalars"]))
            for s in data.get("sites", ())
        )
        return cls(
            data["weight"],
            data["kind"],
            tuple(data["shape"]),
            data["dtype"],
            data.get("source"),
            sites,
            data.get("adapter"),
        )


@dataclasses.dataclass(frozen=True)
class RefitMap:
    entries: tuple[RefitEntry, ...]
    refused: tuple[tuple[str, str], ...] = ()
    """``(weight, reason)`` for adapted weights that cannot be recomputed from an adapter file."""

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [e.to_json() for e in self.entries],
            "refused": [{"weight": w, "reason": r} for w, r in self.refused],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RefitMap:
        entries = tuple(RefitEntry.from_json(e) for e in data.get("entries", ()))
        return cls(entries, tuple((r["weight"], r["reason"]) for r in data.get("refused", ())))

    def adapter_keys(self) -> dict[str, set[str]]:
        """Adapter name → the safetensors keys a refit reads."""
        out: dict[str, set[str]] = {}
        for entry in self.entries:
            if entry.kind == "adapter" and entry.source:
                out.setdefault(entry.adapter or "", set()).add(_key(entry.source))
            for site in entry.sites:
                out.setdefault(site.adapter, set()).update(_key(t) for t in site.tensors if t)
        return out


def build_refit_map(reference: ir.Program, final: ir.Program, initializers: Iterable[str]) -> RefitMap:
    """Map every adapter-dependent initializer of ``final`` back to its adapter keys.

    Args:
        reference: the adapt-stage program (sites unmerged), which says how each weight was adapted.
        final: the program that was lowered (merged or not).
        initializers: the ONNX initializer names of ``final``'s lowering.
    """
    names = set(initializers)
    final_state = {**final.state_dict, **final.constants}
    entries: list[RefitEntry] = []
    refused: list[tuple[str, str]] = []
    # Unmerged: adapter tensors that are still initializers.
    for node in final.graph.nodes:
        info = node.meta.get(ir.meta.PEFTC, {}) if node.op == "placeholder" else {}
        fqn = ir.placeholder_fqn(final, node) if "source" in info else None
        if fqn is None or fqn not in names:
            continue
        if not _plain_source(info["source"]):
            refused.append((fqn, f"computed at compile time ({info['source']}); recompile to change it"))
            continue
        tensor = final_state[fqn]
        entries.append(
            RefitEntry(
                fqn, "adapter", tuple(tensor.shape), _dtype(tensor), source=info["source"], adapter=info.get("adapter")
            )
        )
    # Merged: weights whose sites were folded into them (sites still in ``final`` are unmerged).
    unmerged = {ir.placeholder_fqn(final, root) for root, _, _ in _merged_chains(final)}
    for root, sites, reason in _merged_chains(reference):
        fqn = ir.placeholder_fqn(reference, root)
        if fqn is None or fqn in unmerged:
            continue
        copies = sorted(n for n in names if n.startswith(f"{fqn}_merged"))
        if copies:
            refused.append((copies[0], "a tied weight merged into a copy; recompile to change it"))
            continue
        if fqn not in names:
            continue
        if reason:
            refused.append((fqn, reason))
            continue
        tensor = final_state[fqn]
        entries.append(RefitEntry(fqn, "merged", tuple(tensor.shape), _dtype(tensor), sites=tuple(sites)))
    return RefitMap(tuple(sorted(entries, key=lambda e: e.weight)), tuple(sorted(refused)))


def base_weights(reference: ir.Program, refit_map: RefitMap) -> dict[str, torch.Tensor]:
    """The base (unadapted) value of every merged entry, to store in :data:`BASE_FILE`."""
    state = {**reference.state_dict, **reference.constants}
    return {e.weight: state[e.weight].detach().contiguous() for e in refit_map.entries if e.kind == "merged"}


def refit_weights(
    refit_map: RefitMap,
    base: Mapping[str, torch.Tensor],
    adapters: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The value of every refit-map weight for new adapter tensors.

    Args:
        refit_map: the artifact's map.
        base: base weights by name (:data:`BASE_FILE`).
        adapters: adapter name → safetensors key → tensor (the new adapter, under the name the artifact
            was built with).

    Raises:
        InputError: the map has refused weights, or a key is missing or has another shape than the
            artifact's (the new adapter's slots do not match), naming the key.
    """
    if refit_map.refused:
        weight, reason = refit_map.refused[0]
        raise InputError(f"cannot refit {weight}: {reason}")
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for entry in refit_map.entries:
            if entry.kind == "adapter":
                value = _lookup(adapters, entry.adapter or "", entry.source or "")
            else:
                value = base.get(entry.weight)
                if value is None:
                    raise InputError(f"{BASE_FILE}: no base weight {entry.weight!r}; the artifact is not refittable")
                for site in entry.sites:
                    value = _apply(site, value, adapters)
            if tuple(value.shape) != entry.shape:
                raise InputError(
                    f"{entry.weight}: the new adapter gives shape {list(value.shape)}, the engine has {list(entry.shape)}"
                )
            out[entry.weight] = value.to(getattr(torch, entry.dtype)).contiguous()
    return out


def _apply(site: RefitSite, weight: torch.Tensor, adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``op(W, …)`` for a weight site; a call site (merged) through its weight form, as ``merge`` did."""
    tensors = [None if t is None else _lookup(adapters, site.adapter, t) for t in site.tensors]
    op = registry.site_ops()[site.op]
    if op.form == "call":
        op, operands = op.weight_form(*tensors, *site.scalars)["weight"]
        return op.overload(weight, *operands)
    return op.overload(weight, *tensors, *site.scalars)


def _lookup(adapters: Mapping[str, Mapping[str, torch.Tensor]], adapter: str, source: str) -> torch.Tensor:
    tensors = adapters.get(adapter)
    if tensors is None:
        raise InputError(f"no tensors given for adapter {adapter!r} (the artifact was built with it)")
    key = _key(source)
    if key not in tensors:
        raise InputError(f"adapter {adapter!r}: key {key!r} missing; the artifact's slots need it ({source})")
    return tensors[key]


def _merged_chains(reference: ir.Program) -> list[tuple[fx.Node, list[RefitSite], str | None]]:
    """Every adapted parameter of ``reference`` with its sites, innermost first (or why not)."""
    ops = {op.overload: op for op in registry.site_ops().values()}
    weight_ops = {target for target, op in ops.items() if op.form == "weight"}
    calls = {target for target, op in ops.items() if op.form == "call" and op.weight_form is not None}
    out = []
    seen: set[str] = set()
    for node in reference.graph.nodes:
        if node.op != "call_function":
            continue
        chain_end = node.target in weight_ops and not any(u.target in weight_ops for u in node.users)
        if not (chain_end or node.target in calls):
            continue
        sites: list[RefitSite] = []
        reason = None
        current = node
        root: fx.Node | None = None
        while True:
            site, why = _site(current, ops[current.target])
            reason = reason or why
            if site is not None:
                sites.insert(0, site)
            operand = current.args[1] if current.target in calls else current.args[0]  # x, then the weight
            if not isinstance(operand, fx.Node):
                break
            if operand.op == "call_function" and operand.target in weight_ops:
                current = operand
                continue
            if operand.op != "placeholder" or ir.placeholder_fqn(reference, operand) is None:
                reason = reason or f"the base operand {operand.name} is computed in the graph"
            root = operand
            break
        fqn = ir.placeholder_fqn(reference, root) if root is not None and root.op == "placeholder" else None
        if fqn is None or fqn in seen:
            continue
        seen.add(fqn)
        out.append((root, sites, reason))
    return out


def _site(node: fx.Node, op: SiteOp) -> tuple[RefitSite | None, str | None]:
    info = node.meta.get(ir.meta.PEFTC, {})
    start = op.operands_start
    count = len(op.tensor_roles)
    tensor_args, scalars = node.args[start : start + count], node.args[start + count :]
    if op.form == "call" and "bias" in op.weight_form(*tensor_args, *scalars):
        return None, "lora_B.bias folds into the bias too; refit of LoRA biases is not mapped"
    sources: list[str | None] = []
    for arg in tensor_args:
        if arg is None:
            sources.append(None)
            continue
        source = arg.meta.get(ir.meta.PEFTC, {}).get("source") if isinstance(arg, fx.Node) else None
        if source is None or not _plain_source(source):
            return (
                None,
                f"operand {getattr(arg, 'name', arg)} of {info.get('module', node.name)} is not an adapter file tensor",
            )
        sources.append(source)
    if not all(isinstance(s, (bool, int, float, str, type(None), list, tuple)) for s in scalars):
        return None, f"site {info.get('module', node.name)} has non-JSON arguments"
    return RefitSite(op.name, info.get("module", ""), info.get("adapter", ""), tuple(sources), tuple(scalars)), None


def _plain_source(source: str) -> bool:
    """A ``file:key`` as read from the adapter (not a value derived from it at compile time)."""
    return ":" in source and " " not in source


def _key(source: str) -> str:
    return source.split(":", 1)[1]


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
