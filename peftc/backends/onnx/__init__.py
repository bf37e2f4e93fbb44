"""The ONNX target: ``torch.onnx.export`` (dynamo) of the rewritten program, run by onnxruntime.

Export runs without onnxscript's optimizer so every initializer keeps its state-dict key as its
name (the optimizer's constant folding renames weights ``val_N``); onnxruntime performs the same
folding when it loads the file, at the same run-time speed. Only nodes over ``Constant`` nodes alone
are folded at export (shape arithmetic, reduction axes, gather indices): TensorRT's parser needs such
inputs as constants and does not fold them itself, and no initializer is touched. peftc then names
the outputs after the model's output pytree and the dynamic dims after the input signature, and
writes weights as external data when the model exceeds the 2 GB protobuf limit. In a model for
onnxruntime that is not fused (adapter tensors or slots left), a weight the graph only transposes is
stored transposed, named ``<key>.T`` (``transposes.py``), instead of being folded by onnxruntime at load.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc import ir, memory
from peftc.artifact.files import listed
from peftc.backends.base import Availability, Capabilities, Lowered, LowerRequest
from peftc.backends.onnx import fusion
from peftc.backends.onnx.streaming import save
from peftc.backends.onnx.transposes import store_transposed
from peftc.loaders.inputs import InputSignature
from peftc.methods import registry

MODEL_FILE = "model.onnx"
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # keep a margin for the graph itself


class OnnxBackend:
    """Lower to ONNX; run with onnxruntime's CPU provider."""

    name = "onnx"
    capabilities = Capabilities(
        dynamic_shapes=True,
        adapter_swap=True,
        device="cpu",
        precisions={
            "fp32": "program", "fp16": "program",
            "int8": "quantize", "int8-static": "quantize", "int8-weight": "quantize", "int4": "quantize",
        },
        precision_hint="onnxruntime's CPU kernels have no bf16; --target aoti computes in bf16",
    )  # fmt: skip
    adapter_suffix = ".onnx_adapter"
    requires = "the Python packages onnx, onnxscript and onnxruntime (installed with peftc)"

    def available(self) -> Availability:
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"missing Python packages {missing} (pip install peftc)")
        return Availability(True)

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime
        import onnxscript

        return {"onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}

    def __init__(self, *, fuse: bool = True) -> None:
        self.fuse = fuse
        """Apply onnxruntime's transformer fusions to a model with no adapter tensors left (off when
        the ONNX is for another runtime: TensorRT parses standard ops only)."""

    def lower(self, request: LowerRequest, directory: Path, progress: Any) -> Lowered:
        """Export to ``directory/model.onnx``; ``overridable`` initializers also become graph inputs
        (their stored value is the default), which is how adapter slots are fed. A model with no
        adapter tensors left (merged) is then fused for onnxruntime (``fusion.py``)."""
        program, signature, overridable = request.program, request.signature, request.overridable
        example = signature.example(signature.trace_sizes())
        onnx_program = torch.onnx.export(
            program,
            (),
            kwargs=example,
            dynamo=True,
            optimize=False,
            custom_translation_table=translations(),
            verbose=False,
        )
        model = onnx_program.model
        _name_outputs(model, ir.output_names(program))
        _name_dims(model, signature)
        _make_overridable(model, overridable)
        from peftc.quant.onnx import repack_nbits

        repack_nbits(model)  # GPTQ / AWQ layers: com.microsoft.MatMulNBits on the repacked codes
        _fold_constant_nodes(model)
        _drop_debug_metadata(model)
        initializer_bytes = sum(
            v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
        )
        external = initializer_bytes > PROTOBUF_LIMIT
        adapter_initializers = _adapter_initializers(program, model, overridable)
        fusing = self.fuse and not adapter_initializers and not overridable and not external
        if self.fuse and not fusing and not external:  # for onnxruntime, which would fold them at load
            store_transposed(model, keep={*adapter_initializers, *overridable})
        if external:
            onnx_program.save(str(directory / MODEL_FILE), external_data=True)
        else:
            save(model, directory / MODEL_FILE)
        summary, fusions, not_run = _summary(model, overridable), {}, ()
        if fusing:
            progress("onnx: onnxruntime fusions (attention, skip-norm, bias-gelu)")
            fused = fusion.fused(directory / MODEL_FILE, model, lambda m: _summary(m, overridable))
            del model, onnx_program  # the fused model's folded weights are not kept beside onnxruntime's session
            memory.collect(initializer_bytes)  # the dropped models' reference cycles
            summary, fusions, not_run = fusion.checked(directory / MODEL_FILE, fused, summary, program, example)
        files = sorted(p.name for p in directory.iterdir() if p.is_file())
        return Lowered(
            files=tuple(files),
            inputs=summary["inputs"],
            outputs=summary["outputs"],
            info={
                **summary["info"],
                "external_data": external,
                "adapter_initializers": adapter_initializers,
                "fusions": fusions,
            },
            not_run=not_run,
        )

    def describe(self, path: Path) -> dict[str, Any]:
        """The graph facts of ``lower``'s ``info`` for the model file at ``path`` (after quantizing)."""
        import onnx_ir

        return _facts(onnx_ir.load(str(path)))

    def load(self, directory: Path, target: Mapping[str, Any]):
        """An onnxruntime runner (a :class:`~peftc.backends.base.SlotRunner`)."""
        from peftc.backends.ort import OrtRunner

        return OrtRunner(listed(directory, target, MODEL_FILE))

    def quantizer(self, lowered: Lowered, directory: Path, precision: str, scratch: Path) -> Any:
        """``peftc/backends/onnx/quantize.py`` (a :class:`~peftc.backends.base.QuantizingBackend`)."""
        from peftc.backends.onnx.quantize import OnnxQuantizer

        return OnnxQuantizer(self, lowered, directory / MODEL_FILE, precision, scratch)

    def write_adapter(self, path: Path, tensors: Mapping[str, np.ndarray]) -> None:
        """Write slot values as an onnxruntime adapter file (``onnxruntime.AdapterFormat``)."""
        from peftc.backends.ort import write_adapter_file

        write_adapter_file(path, tensors)


def _summary(model: Any, overridable: Sequence[str] = ()) -> dict[str, Any]:
    """What :class:`Lowered` reports of ``model``: its inputs (adapter slots aside), outputs and graph facts."""
    return {
        "inputs": tuple(_describe(v) for v in model.graph.inputs if v.name not in overridable),
        "outputs": tuple(_describe(v) for v in model.graph.outputs),
        "info": {"opset": model.opset_imports.get("", None), **_facts(model)},
    }


def _facts(model: Any) -> dict[str, Any]:
    ops = Counter(node.op_type for node in model.graph)
    values = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    return {
        "nodes": sum(ops.values()),
        "op_counts": dict(sorted(ops.items())),
        "initializers": len(model.graph.initializers),
        "initializer_bytes": sum(v.nbytes for v in values),
    }


def _make_overridable(model: Any, names: Sequence[str]) -> None:
    initializers = model.graph.initializers
    for name in names:
        if name not in initializers:
            raise AssertionError(f"slot tensor {name} lost its name in ONNX")
        model.graph.inputs.append(initializers[name])


DEBUG_METADATA = (
    "pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy",
    "pkg.torch.onnx.name_scopes",
)  # fmt: skip
"""The exporter's per-node debugging text (the Python stack, the FX node, the module classes and scopes: ~1.5 kB
a node, 3.9 MB of a 71 MB QLoRA model), dropped from the saved model; the module path (``namespace``, which
``quantize.py`` reads) stays."""


def _drop_debug_metadata(model: Any) -> None:
    import onnx_ir

    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        for key in DEBUG_METADATA:
            node.metadata_props.pop(key, None)


def _fold_constant_nodes(model: Any) -> None:
    """Fold the nodes whose inputs are all ``Constant`` node outputs; nodes reading an initializer
    or a graph input keep their names and stay for onnxruntime to fold at load time."""
    from onnxscript.optimizer import fold_constants

    def only_constant_nodes(node: Any) -> bool | None:
        return False if any(v is not None and (v.is_initializer() or v.is_graph_input()) for v in node.inputs) else None

    fold_constants(model, should_fold=only_constant_nodes)


def _name_outputs(model: Any, names: list[str]) -> None:
    taken = {v.name for node in model.graph for v in node.outputs} | {v.name for v in model.graph.inputs}
    for value, name in zip(model.graph.outputs, names, strict=True):
        if value.name == name:
            continue
        if name in taken:
            clash = next(v for node in model.graph for v in node.outputs if v.name == name)
            clash.name = f"{name}__internal"
        value.name = name


def _name_dims(model: Any, signature: InputSignature) -> None:
    import onnx_ir

    symbols: dict[str, str] = {}
    by_name = {spec.name: spec for spec in signature.inputs}
    for value in model.graph.inputs:
        spec = by_name.get(value.name)
        if spec is None or value.shape is None:
            continue
        for dim, want in zip(value.shape.dims, spec.shape, strict=False):
            if isinstance(want, str) and isinstance(dim, onnx_ir.SymbolicDim) and dim.value:
                symbols[dim.value] = want
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(symbols, key=len, reverse=True))) + r")\b")
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph for v in node.outputs)]
    for value in values:
        if value.shape is None:
            continue
        dims = [
            onnx_ir.SymbolicDim(pattern.sub(lambda m: symbols[m.group(1)], d.value))
            if isinstance(d, onnx_ir.SymbolicDim) and d.value
            else d
            for d in value.shape.dims
        ]
        value.shape = onnx_ir.Shape(dims)


def _describe(value: Any) -> dict[str, Any]:
    dims = []
    for d in value.shape.dims if value.shape is not None else []:
        dims.append(d if isinstance(d, int) else getattr(d, "value", None) or str(d))
    dtype = str(np.dtype(value.dtype.numpy())) if value.dtype is not None else None
    return {"name": value.name, "dtype": dtype, "shape": dims}


def translations() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: every call-site op's ONNX translation
    (``SiteOp.onnx``, ``module:function``), imported now."""
    from peftc.quant.ops import OPS as QUANT_OPS

    table = {}
    for op in [*registry.site_ops().values(), *QUANT_OPS]:
        if op.onnx:
            module, _, name = op.onnx.partition(":")
            table[op.overload] = getattr(importlib.import_module(module), name)
    return table


def _adapter_initializers(program: ir.Program, model: Any, overridable: Sequence[str]) -> dict[str, str]:
    """ONNX initializer name -> adapter ``file:key`` for adapter tensors still in the graph
    (``overridable`` ones, adapter slots, hold whichever adapter is active and are left out)."""
    names = set(model.graph.initializers)
    out = {}
    for node in program.graph.nodes:
        info = node.meta.get(ir.meta.PEFTC, {})
        fqn = ir.placeholder_fqn(program, node) if node.op == "placeholder" else None
        if fqn and "source" in info and fqn not in overridable:
            if fqn not in names:
                raise AssertionError(f"adapter tensor {fqn} lost its name in ONNX")
            out[fqn] = info["source"]
    return out
