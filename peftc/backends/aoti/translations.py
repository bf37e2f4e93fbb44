"""How AOTInductor sees the ``peftc::`` call-site ops: as their own eager bodies.

Weight-site ops are ``CompositeImplicitAutograd`` and decompose by themselves; call-site ops
(``lora_linear``, the adapter slots) are opaque custom ops (one node in peftc's IR), so
``ExportedProgram.run_decompositions`` is given their eager bodies (``peftc.ops.base.CALL_BODIES``),
which it traces into ATen ops Inductor can fuse. The reference math is thereby the compiled math.
"""

from __future__ import annotations

from typing import Any

import torch


def table() -> dict[Any, Any]:
    """Decomposition table for ``run_decompositions``: every call-site op → its eager body."""
    import peftc.ops  # noqa: F401  (registers the ops)
    from peftc.ops.base import CALL_BODIES

    return {getattr(torch.ops.peftc, name).default: body for name, body in CALL_BODIES.items()}
