"""What every ``peftc::`` site op has in common.

An adapter site takes one of two forms:

* **call site** — replaces one call of an adapted module. Arguments, in order: ``x`` (the activation
  flowing in), the base module's tensors (``weight``, ``bias``; ``None`` where absent), the adapter's
  tensors by role, the adapter's scalars. Used where the adapter must stay a separate computation at
  run time (LoRA's two thin matmuls, swappable and mixed-adapter batches).
* **weight site** — replaces one *parameter* of an adapted module by an effective value computed
  from it: ``W' = op(W, *adapter tensors, *scalars)``. The module's own computation (linear, conv,
  embedding, or whatever reads a raw parameter) is left untouched and reads ``W'``. Every mergeable
  method is such a transform, which is what makes merging generic: folding a weight site *is* the
  merge, and stacking adapters is composing their transforms.
* **activation site** — transforms the activation at the output (or the input) of a module's call,
  ``y' = op(y, *adapter tensors, *scalars)``, leaving the module itself alone: SSF's scale and shift,
  ZeroI2V's linear adapters, STDHA's temporal shift. Re-parameterisation passes (``fold-ssf``,
  ``fold-linear-adapters``) fold the affine ones into the neighbouring layer's weights.

Each op's eager body is the reference math of its method, written once in ``peftc/ops/<method>.py``.
Weight ops are registered as ``CompositeImplicitAutograd``: they stay one node in peftc's IR, while
exporters (``torch.onnx``, AOTInductor) decompose them into ATen ops without per-backend code. Their
bodies compute in fp32 and return the parameter's dtype, so folding one is the fp32 merge.

A :class:`SiteOp` describes an op's argument layout so adapter parsers and the insertion pass agree
on it without knowing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])

# One library object per process for the composite weight ops (custom_op makes its own).
_LIBRARY = torch.library.Library("peftc", "FRAGMENT")

# How a parameter is laid out, which tells weight ops how to read ΔW shapes:
#   linear    [d_out, d_in]          nn.Linear
#   linear_t  [d_in, d_out]          transformers Conv1D (fan_in_fan_out)
#   conv      [d_out, d_in/groups, *kernel]
#   embedding [num_embeddings, dim]
LAYOUTS = ("linear", "linear_t", "conv", "embedding")


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
    """Call sites only: local names of the module's tensors passed after ``x``."""
    user_inputs: tuple[str, ...] = ()
    """Call sites only: program inputs passed last (created by the insertion pass if missing)."""

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The registered ``torch.ops.peftc.<name>.default``."""
        return getattr(torch.ops.peftc, self.name).default


CALL_BODIES: dict[str, Callable[..., torch.Tensor]] = {}
"""Call-site op name → its eager Python body, for backends that decompose ops rather than translate them."""


def call_op(name: str) -> Callable[[F], Any]:
    """Register the decorated function as the opaque custom op ``peftc::<name>`` (one IR node; a backend
    translates it or decomposes it into its body, kept in :data:`CALL_BODIES`)."""

    def register(fn: F) -> Any:
        CALL_BODIES[name] = fn
        return torch.library.custom_op(f"peftc::{name}", mutates_args=())(fn)

    return register


def weight_op(schema: str) -> Callable[[F], F]:
    """Register the decorated function as the composite op ``peftc::<schema>``."""

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
