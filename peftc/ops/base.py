"""What every ``peftc::`` site op has in common.

A site op replaces one call of an adapted module. Its arguments are always, in order:

1. ``x``: the activation flowing into the module;
2. the base module's own tensors (``weight``, ``bias``...), exactly as stored in the base model;
3. the adapter's tensors, by role (``lora_A``, ``lora_B``...), ``None`` where an optional one is absent;
4. the adapter's scalars (``scale``, layout flags...).

Its eager body *is* the reference math of the method (written once, in ``peftc/ops/<method>.py``),
its fake body gives shapes for export, and each backend has one translation for it. A
:class:`SiteOp` describes that argument layout so adapter parsers and the insertion pass agree on it
without knowing each other.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SiteOp:
    """The calling convention of one ``peftc::`` site op."""

    name: str
    """Op name in the ``peftc`` namespace, e.g. ``"lora_linear"``."""
    base_params: tuple[str, ...]
    """Local names of the base module's tensors passed after ``x`` (absent ones become ``None``)."""
    tensor_roles: tuple[str, ...]
    """Adapter tensor roles, in argument order."""
    scalars: tuple[str, ...]
    """Scalar argument names, in argument order."""

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The registered ``torch.ops.peftc.<name>.default``."""
        return getattr(torch.ops.peftc, self.name).default
