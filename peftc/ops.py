"""What every ``peftc::`` site op has in common.

An adapter site takes one of three forms:

* **call site** — replaces one call of an adapted module. Arguments, in order: ``x`` (the activation
  flowing in), the base module's tensors (``weight``, ``bias``; ``None`` where absent), the adapter's
  tensors by role, the adapter's scalars. Used where the adapter must stay a separate computation at
  run time (LoRA's two thin matmuls, swappable and mixed-adapter batches).
* **weight site** — replaces one *parameter* of an adapted module by an effective value computed
  from it: ``W' = op(W, *adapter tensors, *scalars)`` (``op(W, *base, …)`` where the transform also
  reads other parameters of the module, ``SiteOp.base_params``). The module's own computation (linear, conv,
  embedding, or whatever reads a raw parameter) is left untouched and reads ``W'``. Every mergeable
  method is such a transform, which is what makes merging generic: folding a weight site *is* the
  merge, and stacking adapters is composing their transforms.
* **activation site** — transforms the activation at the output (or the input) of a module's call,
  ``y' = op(y, *adapter tensors, *scalars)``, leaving the module itself alone: SSF's scale and shift,
  ZeroI2V's linear adapters, STDHA's temporal shift. Re-parameterisation passes (``fold-ssf``,
  ``fold-linear-adapters``) fold the affine ones into the neighbouring layer's weights.

Each op's eager body is the reference math of its method, written once in the method's module
(``peftc/methods/``). Weight and activation ops are registered as ``CompositeImplicitAutograd``
(:func:`composite_op`): they stay one node in peftc's IR, while exporters (``torch.onnx``,
AOTInductor) decompose them into ATen ops without per-backend code. Their bodies compute in fp32 and
return the parameter's dtype, so folding one is the fp32 merge. Call ops are opaque custom ops
(:func:`call_op`): each carries its eager body (AOTInductor decomposes the op into it), the module
path of its ONNX translation, and — when it merges — its weight form.

A :class:`SiteOp` describes an op's argument layout so adapter parsers, passes and backends agree on
it without knowing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])

# One library object per process for the composite ops (custom_op makes its own).
_LIBRARY = torch.library.Library("peftc", "FRAGMENT")

# How a parameter is laid out, which tells weight ops how to read ΔW shapes:
#   linear    [d_out, d_in]          nn.Linear
#   linear_t  [d_in, d_out]          transformers Conv1D (fan_in_fan_out)
#   conv      [d_out, d_in/groups, *kernel]
#   embedding [num_embeddings, dim]
LAYOUTS = ("linear", "linear_t", "conv", "embedding")

WeightForm = Callable[..., Mapping[str, tuple["SiteOp", tuple[Any, ...]]]]
"""A call op's adapter operands (tensors by role, then scalars, in argument order) → the weight
sites one call is equivalent to: ``{parameter: (weight op, its operands after the parameter)}``.
Operands pass through untouched, so the same rule maps tensors, graph nodes or adapter records."""


@dataclasses.dataclass(frozen=True)
class SiteOp:
    """The calling convention of one ``peftc::`` site op."""

    name: str
    """Op name in the ``peftc`` namespace, e.g. ``"lora_linear"``."""
    form: Literal["call", "weight", "activation"]
    tensor_roles: tuple[str, ...]
    """Adapter tensor roles, in argument order (absent optional ones are passed as ``None``)."""
    scalars: tuple[str, ...]
    """Scalar argument names, in argument order."""
    base_params: tuple[str, ...] = ()
    """Call sites: local names of the module's tensors passed after ``x``. Weight sites: other
    parameters of the same module passed after the parameter, as the site's adapter finds them
    (after earlier adapters, before this adapter's own sites on them; ``None`` where the module has
    none), for a transform that reads them (GLoRA's bias reads the weight)."""
    user_inputs: tuple[str, ...] = ()
    """Call sites only: program inputs passed last (created by the insertion pass if missing)."""
    body: Callable[..., torch.Tensor] | None = None
    """Call sites only: the eager body (the reference math; AOTInductor decomposes the op into it)."""
    onnx: str | None = None
    """Call sites only: ``module:function`` of the op's ONNX translation, imported when lowering."""
    weight_form: WeightForm | None = None
    """Call sites that merge: the rule from one call to weight sites (see :data:`WeightForm`)."""

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The registered ``torch.ops.peftc.<name>.default``."""
        return getattr(torch.ops.peftc, self.name).default

    @property
    def operands_start(self) -> int:
        """Where the adapter operands start in the op's arguments (after ``x`` or the parameter, and the base)."""
        return 1 + len(self.base_params)

    def weight_sites(
        self, tensors: Mapping[str, Any], scalars: Mapping[str, Any]
    ) -> list[tuple[str, SiteOp, dict[str, Any], dict[str, Any]]]:
        """:attr:`weight_form` for operands given by role and name: ``(param, op, tensors, scalars)``."""
        if self.weight_form is None:
            return []
        operands = [*(tensors.get(r) for r in self.tensor_roles), *(scalars[s] for s in self.scalars)]
        forms = []
        for param, (op, args) in self.weight_form(*operands).items():
            count = len(op.tensor_roles)
            forms.append((param, op, dict(zip(op.tensor_roles, args[:count])), dict(zip(op.scalars, args[count:]))))
        return forms


def call_op(name: str, body: Callable[..., torch.Tensor], fake: Callable[..., torch.Tensor], **fields: Any) -> SiteOp:
    """Register ``body`` as the opaque custom op ``peftc::<name>`` (one IR node) with the shape-only
    ``fake``, and return its :class:`SiteOp` (``form="call"``; ``fields`` are the other SiteOp fields)."""
    torch.library.custom_op(f"peftc::{name}", body, mutates_args=()).register_fake(fake)
    return SiteOp(name=name, form="call", body=body, **fields)


def composite_op(schema: str) -> Callable[[F], F]:
    """Register the decorated function as the composite op ``peftc::<schema>`` (weight and activation
    ops: exporters decompose it into its body)."""

    def register(fn: F) -> F:
        _LIBRARY.define(schema)
        _LIBRARY.impl(schema.split("(", 1)[0], fn, "CompositeImplicitAutograd")
        return fn

    return register


def as_out_in(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The parameter viewed as a ``[d_out, d_in·k]`` matrix (embeddings: ``[num, dim]``)."""
    if layout == "linear_t":
        return weight.T
    if layout == "conv":
        return weight.flatten(1)
    return weight


def from_out_in(matrix: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`as_out_in`: back to the parameter's own shape."""
    if layout == "linear_t":
        return matrix.T
    if layout == "conv":
        return matrix.reshape(like.shape)
    return matrix


def call_arguments(op: SiteOp, args: Sequence[Any]) -> tuple[Any, ...]:
    """The adapter operands (tensors, then scalars) of a call op's argument list."""
    return tuple(args[op.operands_start : op.operands_start + len(op.tensor_roles) + len(op.scalars)])
