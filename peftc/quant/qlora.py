"""A QLoRA model end to end: a quantized base, a LoRA adapter put in by the merge policy, ONNX, checks.

:func:`build` loads a quantized Hugging Face directory (``peftc/quant/loading.py``) and applies the
adapter site by site (``peftc/quant/policy.py``); :func:`lower_onnx` exports the result with the
quantized layers as ``com.microsoft.MatMulBnb4`` (NF4/FP4) or in-graph dequantization (int8), and
:func:`errors` measures, separately, what the compile adds (the artifact against peftc's eager model)
and what the policy and quantization add (peftc's eager model against an oracle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

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
    loaded = load_model(str(model))
    sites = policy.apply(loaded.module, Path(adapter), merge_policy, max_error)
    return QLoRAModel(loaded.module.eval(), sites)


def lower_onnx(module: torch.nn.Module, example: Mapping[str, torch.Tensor], path: Path, dynamic: bool = True) -> Path:
    """``module`` exported to ONNX at ``path`` (quantized layers through their translations)."""
    from peftc.backends.onnx import translations

    dims = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")} for name in example} if dynamic else None
    program = torch.export.export(module, (), dict(example), dynamic_shapes=dims)
    onnx_program = torch.onnx.export(
        program, (), kwargs=dict(example), dynamo=True, optimize=False, custom_translation_table=translations()
    )
    onnx_program.save(str(path))
    return path


def onnx_logits(path: Path, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The first output of the ONNX model at ``path`` on onnxruntime's CPU provider."""
    from peftc.backends.ort import OrtRunner

    runner = OrtRunner(path)
    outputs = runner.run({k: v.numpy() for k, v in feeds.items()})
    return torch.from_numpy(np.asarray(outputs[runner.output_names[0]]))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual − expected| / max|expected|``: the error relative to the output's scale."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-30))
