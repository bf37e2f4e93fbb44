"""Task vectors: each adapter's ΔW = W' − W per base tensor, in fp32, from the adapter's own math.

Every mergeable method is a weight transform (``peftc/ops.py``): a parser turns an adapter into sites
whose weight form is ``W' = op(W, factors…)`` (LoRA, rsLoRA, ``alpha_pattern``, ``lora_bias``, DoRA,
LoHa, LoKr, (IA)³, …) and full replacements (``modules_to_save``, trained biases). :class:`TaskVectors`
evaluates them on the base tensor in fp32 — the same ops the merge pass folds — and subtracts the
base, one tensor at a time, so combining never holds more than one tensor's deltas of each adapter.
Methods never see factors: ΔW is the task vector, whatever the parametrisation.

The rules on what may be combined:

* **One base.** Every adapter is parsed against the base given (module names and shapes checked by
  its parser), and adapters whose configs name different models (``base_model_name_or_path``,
  compared as ``peftc.loaders.identity`` does) are refused: equal shapes do not make the same base.
* **Different target sets: union with zeros.** An adapter that does not touch a tensor has a zero
  task vector there, as in full-model merging.
* **Weight transforms only.** An activation site (SSF, ZeroI2V) or a call site with no weight form
  has no ΔW: refused, naming the adapter, method and module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.loaders import identity
from peftc.methods import registry
from peftc.methods.base import Adapter
from peftc.ops import SiteOp


@dataclasses.dataclass(frozen=True)
class Step:
    """One weight transform an adapter applies to a base tensor."""

    op: SiteOp
    tensors: tuple[torch.Tensor | None, ...]
    scalars: tuple[Any, ...]

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        """``op(value, tensors…, scalars…)``."""
        return self.op.overload(value, *self.tensors, *self.scalars)


@dataclasses.dataclass(frozen=True)
class Change:
    """Everything one adapter does to one base tensor: a replacement, then weight transforms in order."""

    replacement: torch.Tensor | None
    steps: tuple[Step, ...]


class TaskVectors:
    """The task vectors of ``adapters`` on the base tensors of ``modules``, tensor by tensor.

    Args:
        modules: the base model's module table (its ``tensors`` hold the base values).
        adapters: the parsed adapters, in the order the user gave them.

    Raises:
        InputError: adapters recorded for different models.
        UnsupportedError: a site with no weight form.
    """

    def __init__(self, modules: ModuleTable, adapters: Sequence[Adapter]) -> None:
        self.modules = modules
        self.adapters = tuple(adapters)
        _check_same_base(self.adapters)
        self.changes: list[dict[str, Change]] = [_changes(a, modules) for a in self.adapters]
        keys = {k for changes in self.changes for k in changes}
        order = list(modules.tensors)
        self.keys: tuple[str, ...] = tuple(sorted(keys, key=lambda k: order.index(k) if k in order else len(order)))
        """Every base tensor some adapter changes, in the model's order (the union of the target sets)."""

    def base(self, key: str) -> torch.Tensor:
        """The base tensor ``key`` in fp32."""
        return self.modules.tensors[key].detach().to(torch.float32)

    def delta(self, index: int, key: str) -> torch.Tensor:
        """``W' − W`` of adapter ``index`` on tensor ``key`` (zeros where it does not touch it), fp32."""
        base = self.base(key)
        change = self.changes[index].get(key)
        if change is None:
            return torch.zeros_like(base)
        with torch.no_grad():
            value = base if change.replacement is None else change.replacement.to(torch.float32)
            for step in change.steps:
                value = step.apply(value)
        return value.to(torch.float32) - base

    def deltas(self, key: str) -> list[torch.Tensor]:
        """Every adapter's task vector on ``key``, in adapter order."""
        return [self.delta(i, key) for i in range(len(self.adapters))]

    def layout(self, key: str) -> str | None:
        """``linear`` / ``linear_t`` for the weight of a linear module (``nn.Linear``, a Conv1D), else None."""
        owner, _, local = key.rpartition(".")
        module = self.modules.get(owner)
        if module is None or local != "weight" or len(self.modules.tensors[key].shape) != 2:
            return None
        if module.class_name in ("Linear", "NonDynamicallyQuantizableLinear"):
            return "linear"
        return "linear_t" if module.class_name == "Conv1D" else None

    def factors(self, index: int, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B, A)`` with ``ΔW = B·A`` ([d_out, d_in] orientation) when adapter ``index``'s change of
        ``key`` is a single LoRA update (its own rank, exact); None otherwise."""
        change = self.changes[index].get(key)
        if change is None or change.replacement is not None or len(change.steps) != 1:
            return None
        step = change.steps[0]
        if step.op.name != "lora_weight" or step.scalars[1] not in ("linear", "linear_t"):
            return None
        lora_a, lora_b = step.tensors
        scale = float(step.scalars[0])
        return lora_b.to(torch.float32) * scale, lora_a.to(torch.float32)

    def ranks(self) -> list[int]:
        """Each adapter's largest LoRA rank (0 for an adapter with no LoRA update)."""
        out = []
        for index in range(len(self.adapters)):
            found = [f[1].shape[0] for k in self.changes[index] if (f := self.factors(index, k)) is not None]
            out.append(max(found, default=0))
        return out


def _changes(adapter: Adapter, modules: ModuleTable) -> dict[str, Change]:
    ops = registry.site_ops()
    replacements = {r.param: r.tensor.tensor for r in adapter.replacements}
    steps: dict[str, list[Step]] = {}
    for site in adapter.sites:
        op = ops[site.op]
        forms = site.weight_form if op.form == "call" else (site,) if op.form == "weight" else ()
        if not forms:
            kind = "an activation transform" if op.form == "activation" else "a call with no weight form"
            raise UnsupportedError(
                f"adapter {adapter.name!r}: {adapter.method} on {site.module!r} is {kind} ({site.op}), which has "
                "no weight delta; combine works on ΔW of weight transforms"
            )
        for form in forms:
            form_op = ops[form.op]
            key = modules[form.module].params[form.param or "weight"]
            tensors = tuple(form.tensors[r].tensor if form.tensors.get(r) else None for r in form_op.tensor_roles)
            steps.setdefault(key, []).append(Step(form_op, tensors, tuple(form.scalars[s] for s in form_op.scalars)))
    return {key: Change(replacements.get(key), tuple(steps.get(key, ()))) for key in sorted({*replacements, *steps})}


def _check_same_base(adapters: Sequence[Adapter]) -> None:
    named = []
    for adapter in adapters:
        recorded = adapter.source.config.get("base_model_name_or_path")
        if isinstance(recorded, str) and recorded.strip():
            named.append((adapter, identity.normalise(identity.adapter_model_name(recorded))))
    for adapter, name in named[1:]:
        first, first_name = named[0]
        if name and first_name and name != first_name:
            raise InputError(
                f"{adapter.source.config_path}: adapter {adapter.name!r} was trained on {name!r}, adapter "
                f"{first.name!r} on {first_name!r}; combine adapters of one base model"
            )


def layer_index(key: str) -> int | None:
    """The block a tensor belongs to: the first all-digit component of its name (``layer.3.`` → 3)."""
    for part in key.split("."):
        if part.isdigit():
            return int(part)
    return None
