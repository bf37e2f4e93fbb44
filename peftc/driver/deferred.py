"""The artifact's runner in verification, opened only when the artifact first runs.

Verification runs every eager oracle before the artifact (``peftc.verification.verify``). Opening the
artifact's runtime (an onnxruntime session builds its own copy of the weights) is deferred to that
moment, and the model's weights that are pages of its safetensors file are handed back to the kernel
just before (``peftc.memory.page_out``): the torch copy and the runtime's copy of the weights are then
not resident together. A later oracle that reads those weights (a mode that interleaves them) reads
them from the file again, with the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from peftc import memory
from peftc.driver.build import Built


class DeferredRunner:
    """A backend runner opened by ``open`` at the first use of any of its attributes, after the
    file-mapped pages of ``weights()`` are paged out."""

    def __init__(self, open: Callable[[], Any], weights: Callable[[], Iterator[torch.Tensor]]) -> None:
        self._open, self._weights = open, weights
        self._runner: Any = None

    @property
    def opened(self) -> bool:
        """Whether the runner has been opened."""
        return self._runner is not None

    def __getattr__(self, name: str) -> Any:
        if self._runner is None:
            weights = list(self._weights())
            memory.collect(sum(t.nbytes for t in weights))  # e.g. the merged program, dropped after lowering
            memory.page_out(weights)
            self._runner = self._open()
        return getattr(self._runner, name)


def model_weights(built: Built) -> Iterator[torch.Tensor]:
    """The base model's tensors in every world: its module's parameters and buffers and its program's."""
    for world in built.worlds:
        if world.module is not None:
            yield from world.module.parameters()
            yield from world.module.buffers()
        yield from memory.program_tensors(world.base)
