"""Combining adapters into one (``peftc combine``; ``peftc compile --combine``): ``shared/methods.md`` §9.

Every method works on task vectors ``τ_i = ΔW_i``, materialised in fp32 per base tensor from each
adapter's own weight transform (``deltas.py``), never on factors separately. One module per concern:

* ``options.py`` — :class:`CombineOptions` and ``--combine M[:k=v,…]`` parsing, with the checks;
* ``deltas.py`` — task vectors, tensor by tensor, and the rules on what may be combined;
* ``sparsify.py`` / ``merge.py`` / ``pcb.py`` — per-tensor methods and the conventions;
* ``sequential.py`` — LiNeS and OPCM (whole-model norms);
* ``lowrank.py`` — ``cat`` and ``svd``;
* ``output.py`` — a PEFT LoRA directory or peftc's full-ΔW adapter (``peftc/methods/delta.py``);
* ``run.py`` — the command's flow; ``report.py`` — what it reports; ``cli.py`` — its flags.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CombineOptions", "combine"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``peftc.cli`` declares the command without importing torch.
    if name == "combine":
        from peftc.combine.run import combine

        return combine
    if name == "CombineOptions":
        from peftc.combine.options import CombineOptions

        return CombineOptions
    raise AttributeError(name)
