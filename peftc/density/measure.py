"""Measure MLP activation density with forward hooks on the activation modules (eager; no tracing).

Per block, over every calibration row (each token of each sequence; padded positions included, as
DEFT's own evaluation counts them):

* ``density``: the fraction of activation entries that are exactly non-zero (DEFT's measure,
  ``count_nonzero(a) / numel(a)``);
* ``density_above_threshold``: the fraction with ``|a| > threshold`` (an absolute value in the
  activation's units, :data:`THRESHOLD` by default): the meaningful density of GELU/SiLU, whose
  outputs are almost never exactly 0;
* ``frequency``: per neuron, the fraction of rows where it is non-zero; ``dead_neurons``: how many
  are never non-zero (what removal slices out); ``rare_neurons``: how many never exceed the threshold.

And per neuron, of the down projection's input ``h`` (the activation itself, or ``act(gate)·up`` in a
gated MLP): ``peak``, the largest ``|h|``, and ``total``, the sum of ``h`` (float64) over the rows, from
which removal of smooth activations (GELU, SiLU) decides and folds (``exploit.dead_neurons``,
``modules.folded_bias``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from peftc.density.blocks import Block

THRESHOLD = 1e-2
"""Default ``--threshold``: ``|a|`` at or below it counts as inactive in ``density_above_threshold``."""


@dataclasses.dataclass
class Counts:
    """Running counts of one block's activations."""

    block: Block
    threshold: float = THRESHOLD
    rows: int = 0
    nonzero: torch.Tensor | None = None
    above: torch.Tensor | None = None
    peak: torch.Tensor | None = None
    total: torch.Tensor | None = None

    def add(self, a: torch.Tensor) -> None:
        """Count the activation output ``a`` of one call."""
        flat = a.detach().reshape(-1, a.shape[-1])
        nonzero, above = (flat != 0).sum(0), (flat.abs() > self.threshold).sum(0)
        self.nonzero = nonzero if self.nonzero is None else self.nonzero + nonzero
        self.above = above if self.above is None else self.above + above
        self.rows += flat.shape[0]

    def add_down_input(self, h: torch.Tensor) -> None:
        """Accumulate the down projection's input ``h`` of one call (``peak``, ``total``)."""
        flat = h.detach().reshape(-1, h.shape[-1])
        peak, total = flat.abs().amax(0), flat.double().sum(0)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.total = total if self.total is None else self.total + total

    def mean(self) -> torch.Tensor:
        """Each neuron's mean down-projection input over the calibration rows (float64)."""
        assert self.total is not None and self.rows
        return self.total / self.rows

    def record(self, threshold: float) -> dict[str, Any]:
        """The block's JSON record (``peftc analyze --density --json``'s ``layers`` entries)."""
        if self.nonzero is None or self.above is None:
            raise RuntimeError(f"{self.block.activation} never ran on the calibration inputs")
        cells = self.rows * self.nonzero.numel()
        return {
            "name": self.block.activation,
            "activation": self.block.kind,
            "exact_zeros": self.block.exact_zeros,
            "ups": list(self.block.ups),
            "down": self.block.down,
            "neurons": self.nonzero.numel(),
            "rows": self.rows,
            "density": int(self.nonzero.sum()) / cells,
            "density_above_threshold": int(self.above.sum()) / cells,
            "dead_neurons": int((self.nonzero == 0).sum()),
            "rare_neurons": int((self.above == 0).sum()),
            "frequency": [round(v, 6) for v in (self.nonzero.double() / self.rows).tolist()],
        }


@contextlib.contextmanager
def hooked(model: torch.nn.Module, blocks: Sequence[Block], threshold: float) -> Iterator[list[Counts]]:
    """Count each block's activations while the ``with`` body runs ``model``."""
    counts = [Counts(block, threshold) for block in blocks]
    handles = []
    for count in counts:

        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor, count: Counts = count) -> None:
            count.add(out)

        def down(module: torch.nn.Module, args: Any, count: Counts = count) -> None:
            count.add_down_input(args[0])

        handles.append(model.get_submodule(count.block.activation).register_forward_hook(hook))
        handles.append(model.get_submodule(count.block.down).register_forward_pre_hook(down))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def run(model: torch.nn.Module, feeds: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``model``'s outputs on each feed (numpy or torch values), as named numpy arrays."""
    from peftc.verification.oracles import to_numpy

    outputs = []
    with torch.no_grad():
        for feed in feeds:
            outputs.append(to_numpy(model(**{k: torch.as_tensor(v) for k, v in feed.items()})))
    return outputs


def measure(
    model: torch.nn.Module, blocks: Sequence[Block], feeds: Iterable[Mapping[str, Any]], threshold: float = THRESHOLD
) -> list[Counts]:
    """Run ``model`` on ``feeds`` and count every block's activations."""
    with hooked(model, blocks, threshold) as counts:
        run(model, feeds)
    return counts
