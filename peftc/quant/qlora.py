"""A QLoRA model as an eager ``nn.Module``: the quantized base with the LoRA applied site by site.

``peftc compile`` is the way to compile a LoRA on a quantized base (``peftc/quant/sites.py``,
``peftc/quant/merge.py``). This module builds the eager module of the same per-site choices
(``peftc.quant.policy.choose``; a ``two-path`` site is :class:`~peftc.quant.modules.TwoPathLinear`, which
runs the same site op) for ``benchmarks/qlora.py`` and the tests of the ONNX lowering of single layers:
:func:`build` loads a quantized Hugging Face directory (``peftc/quant/loading.py``) and applies the
adapter (``policy.apply``); :func:`lower` lowers a module with one of peftc's backends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from peftc.loaders.causal import NO_TASK
from peftc.loaders.inputs import InputSignature
from peftc.loaders.models import load_model
from peftc.quant import policy


@dataclasses.dataclass
class QLoRAModel:
    """A quantized base with the adapter applied, and what each site became."""

    module: torch.nn.Module
    sites: list[policy.SiteChoice]

    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer (packed weights, scales, LoRA factors, float tensors)."""
        tensors = {id(t): t for t in (*self.module.parameters(), *self.module.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def build(model: str | Path, adapter: str | Path, merge_policy: str = "auto", max_error: float | None = None):
    """The quantized model at ``model`` with the LoRA ``adapter`` applied by ``merge_policy``."""
    loaded = load_model(str(model), task=NO_TASK)  # the whole-sequence forward: a generation step is not wired here
    sites = policy.apply(loaded.module, Path(adapter), merge_policy, max_error)
    return QLoRAModel(loaded.module.eval(), sites)


def quant_method(model: str | Path) -> str | None:
    """The ``quant_method`` of the model directory ``model`` (None: not quantized or not a directory)."""
    from peftc.quant.loading import quantization_config

    path = Path(model)
    config = quantization_config(path) if (path / "config.json").is_file() else None
    return None if config is None else config.get("quant_method")


def lower(
    module: torch.nn.Module, target: str, directory: Path, signature: InputSignature | None = None
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """``module`` traced and lowered by peftc's ``target`` backend into ``directory``; returns a function
    from input tensors by name to the artifact's first output.

    Args:
        signature: the module's inputs (default: a Hugging Face model's, from its config).

    ONNX: NF4/FP4 layers become ``com.microsoft.MatMulBnb4``, int8 layers dequantize in the graph.
    AOTInductor (CPU): the ops decompose into their eager bodies; the package is frozen, so Inductor
    folds each dequantization into a float constant at compile time and the matmuls run in fp32.
    """
    from peftc import ir
    from peftc.artifact.manifest import file_record
    from peftc.backends import get_backend
    from peftc.backends.base import LowerRequest
    from peftc.loaders.inputs import from_transformers

    signature = signature or from_transformers(module)
    program = ir.trace(module, signature.example(signature.trace_sizes()), signature.dynamic_shapes())
    backend = get_backend(target)
    lowered = backend.lower(LowerRequest(program, signature), directory, lambda message: None)
    files = [file_record(directory / name, directory) for name in lowered.files]
    runner = backend.load(directory, {**lowered.info, "files": files})
    name = runner.output_names[0]

    def run(feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(runner.run({k: v.numpy() for k, v in feeds.items()})[name]))

    return run


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual − expected| / max|expected|``: the error relative to the output's scale."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-30))
