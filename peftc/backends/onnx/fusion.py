"""onnxruntime's transformer fusions of a lowered model, checked before they replace it.

:func:`fused` constant-folds the exported model with onnxscript's optimizer (8-bit codes stay as stored:
:func:`_codes_kept`) and fuses it for onnxruntime
(``onnxscript.rewriter.ort_fusions``: Attention, SkipLayerNormalization, BiasGelu…) in memory, and
writes it beside the unfused file. Measured on MiniLM (2-vCPU AVX-512 VM): 17 % faster at batch 1, 19 %
at batch 8. Weights are renamed, so only models without adapter tensors are fused (and below the 2 GB
protobuf limit: one file). The exported model itself is fused (its initializers are the program's
tensors: no copy of the weights is read back).

:func:`checked` then loads the fused file in onnxruntime and compares it with what the unfused model
computes on the example inputs (:func:`_expected`; within 1e-3 of each output's scale; the artifact is
verified against its oracles afterwards like any other); otherwise the unfused model stays and
``not_run`` says why (the rewriter has produced ill-typed Gemms on rank-3 inputs). The caller drops the
fused model before that check, and the program's file-mapped weights are paged out once the eager
reference has run (``peftc.memory.page_out``), so onnxruntime builds its session beside neither.

SkipLayerNormalization is split back into Add and LayerNormalization (:func:`_split_skip_norms`):
onnxruntime's CPU kernel for it is several times slower than the two ops it replaces (its share of
MiniLM's batch-8 time was 12 %), and the runner keeps onnxruntime from fusing it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc import ir, memory
from peftc.backends.onnx.streaming import save
from peftc.errors import first_line

Summary = dict[str, Any]
NotRun = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Fused:
    """The fused model's file and summary, or why the fusions failed."""

    path: Path | None
    summary: Summary | None = None
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)
    error: str = ""


def fused(path: Path, exported: Any, summarize: Callable[[Any], Summary]) -> Fused:
    """Fuse ``exported`` (the model saved at ``path``, changed in place) and write it beside ``path``."""
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused_path = path.with_name(f".fused.{path.name}")
    try:
        model = exported
        with _codes_kept(model):
            optimizer.optimize(model)
            model, counts = optimize_for_ort(model)
        counts["skip_layer_normalization"] = counts.get("skip_layer_normalization", 0) - _split_skip_norms(model)
        save(model, fused_path)
        return Fused(fused_path, summarize(model), counts)
    except Exception as e:
        fused_path.unlink(missing_ok=True)
        return Fused(None, error=f"{type(e).__name__}: {first_line(e)}")


@contextlib.contextmanager
def _codes_kept(model: Any) -> Iterator[None]:
    """The 8-bit integer initializers a ``Cast`` reads (a double-quantized absmax, int8 weights) made graph
    inputs while the optimizer runs, so that it cannot fold them into wider copies (the file keeps the
    codes; onnxruntime folds the same at load time); initializers again afterwards."""
    import onnx_ir

    codes = (onnx_ir.DataType.UINT8, onnx_ir.DataType.INT8)
    held = [
        v for v in model.graph.initializers.values()
        if v.dtype in codes and any(use.node.op_type == "Cast" for use in v.uses())
    ]  # fmt: skip
    for value in held:
        model.graph.initializers.pop(value.name)
        model.graph.inputs.append(value)
    try:
        yield
    finally:
        for value in held:
            model.graph.inputs.remove(value)
            model.graph.register_initializer(value)


def checked(
    path: Path, fused: Fused, unfused: Summary, program: ir.Program, example: Mapping[str, torch.Tensor]
) -> tuple[Summary, dict[str, int], NotRun]:
    """The fused model moved to ``path`` if onnxruntime loads it and it computes what the unfused one does:
    its summary and fusion counts; else the unfused model's ``unfused`` summary and why."""
    from peftc.backends.ort import OrtRunner
    from peftc.verification.compare import relative_error

    error = fused.error
    if fused.path is not None:
        try:
            expected = _expected(path, program, example)
            memory.page_out(memory.program_tensors(program))  # read from their file again if used later
            worst = relative_error(expected, OrtRunner(fused.path).run({k: v.numpy() for k, v in example.items()}))
            if not worst <= 1e-3:
                raise ValueError(f"the fused model differs from the unfused one by {worst:.3g} of an output's scale")
        except Exception as e:
            fused.path.unlink(missing_ok=True)
            error = f"{type(e).__name__}: {first_line(e)}"
        else:
            fused.path.replace(path)
            assert fused.summary is not None
            return fused.summary, {k: v for k, v in sorted(fused.counts.items()) if v}, ()
    return unfused, {}, (("onnxruntime fusions", f"kept the unfused model: {error}"),)


def _expected(path: Path, program: ir.Program, example: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """What the fused model must compute on ``example``: the eager program the unfused model at ``path``
    was exported from, when its outputs are fp32 (no onnxruntime session of the unfused model then: it
    would hold the weights twice, with the transposes onnxruntime folds, beside the fused one's);
    otherwise the unfused model in onnxruntime (its fp16 kernels round otherwise than torch's)."""
    from peftc.backends.ort import OrtRunner
    from peftc.verification.oracles import program_oracle

    outputs = program_oracle(program)(example)
    if all(value.dtype != np.float16 for value in outputs.values()):
        return outputs
    return OrtRunner(path).run({k: v.numpy() for k, v in example.items()})


def _split_skip_norms(model: Any) -> int:
    """Replace each ``com.microsoft.SkipLayerNormalization`` whose statistics outputs nothing reads by
    ``Add`` (input + skip [+ bias]) and ``LayerNormalization``; return how many were split."""
    import onnx_ir

    split = 0
    for node in list(model.graph):
        if node.domain != "com.microsoft" or node.op_type != "SkipLayerNormalization":
            continue
        if any(out.uses() for out in node.outputs[1:3]):
            continue
        x, skip, gamma, beta, bias = [*node.inputs, *[None] * (5 - len(node.inputs))]
        total = onnx_ir.Node("", "Add", [x, skip])
        added = [total] if bias is None else [total, onnx_ir.Node("", "Add", [total.outputs[0], bias])]
        epsilon = node.attributes.get("epsilon")
        norm = onnx_ir.Node(
            "",
            "LayerNormalization",
            [added[-1].outputs[0], gamma, *([beta] if beta is not None else [])],
            attributes=[
                onnx_ir.AttrInt64("axis", -1),
                onnx_ir.AttrFloat32("epsilon", epsilon.value if epsilon else 1e-12),
            ],
        )
        model.graph.insert_before(node, [*added, norm])
        pairs = [(node.outputs[0], norm.outputs[0])]
        if len(node.outputs) > 3:
            pairs.append((node.outputs[3], added[-1].outputs[0]))
        for old, new in pairs:
            onnx_ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        for old, new in pairs:  # graph outputs keep their names and types
            new.name, new.type, new.shape = old.name, old.type, old.shape
        split += 1
    return split
