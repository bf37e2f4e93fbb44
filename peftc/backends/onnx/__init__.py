"""The ONNX target: ``torch.onnx.export`` (dynamo) of the rewritten program, run by onnxruntime.

Export runs without onnxscript's optimizer so every initializer keeps its state-dict key as its
name (the optimizer's constant folding renames weights ``val_N``); onnxruntime performs the same
folding when it loads the file, at the same run-time speed. Only nodes over ``Constant`` nodes alone
are folded at export (shape arithmetic, reduction axes, gather indices): TensorRT's parser needs such
inputs as constants and does not fold them itself, and no initializer is touched. peftc then names
the outputs after the model's output pytree and the dynamic dims after the input signature, and
writes weights as external data when the model exceeds the 2 GB protobuf limit.
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

from peftc import ir
from peftc.artifact.files import listed
from peftc.backends.base import Availability, Capabilities, Lowered, LowerRequest
from peftc.backends.onnx.streaming import save
from peftc.errors import first_line
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
        adapter tensors left (merged) is then fused for onnxruntime (:func:`_fuse`)."""
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
        if external:
            onnx_program.save(str(directory / MODEL_FILE), external_data=True)
        else:
            save(model, directory / MODEL_FILE)
        adapter_initializers = _adapter_initializers(program, model, overridable)
        fusions, not_run = {}, ()
        if self.fuse and not adapter_initializers and not overridable and not external:
            progress("onnx: onnxruntime fusions (attention, skip-norm, bias-gelu)")
            model, fusions, not_run = _fuse(directory / MODEL_FILE, model, program, example)
        files = sorted(p.name for p in directory.iterdir() if p.is_file())
        return Lowered(
            files=tuple(files),
            inputs=tuple(_describe(v) for v in model.graph.inputs if v.name not in overridable),
            outputs=tuple(_describe(v) for v in model.graph.outputs),
            info={
                "opset": model.opset_imports.get("", None),
                **_facts(model),
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


def _fuse(
    path: Path, exported: Any, program: ir.Program, example: Mapping[str, torch.Tensor]
) -> tuple[Any, dict[str, int], tuple[tuple[str, str], ...]]:
    """The saved model at ``path``, constant-folded by onnxscript's optimizer and fused for
    onnxruntime (``onnxscript.rewriter.ort_fusions``: Attention, SkipLayerNormalization, BiasGelu…),
    written back, with the fusions that applied. Measured on MiniLM (2-vCPU AVX-512 VM): 17 % faster
    at batch 1, 19 % at batch 8. Weights are renamed, so only models without adapter tensors are
    fused (and below the 2 GB protobuf limit: one file). ``exported`` itself is fused (its initializers
    are the program's tensors: no copy of the weights is read back); the fused model must load in onnxruntime
    and agree with the unfused one on ``example`` (:func:`_expected`; within 1e-3 of each output's
    scale; the artifact
    is verified against its oracles afterwards like any other); otherwise the unfused model stays
    and ``not_run`` says why (the rewriter has produced ill-typed Gemms on rank-3 inputs).

    SkipLayerNormalization is split back into Add and LayerNormalization (:func:`_split_skip_norms`):
    onnxruntime's CPU kernel for it is several times slower than the two ops it replaces (its share of
    MiniLM's batch-8 time was 12 %), and the runner keeps onnxruntime from fusing it again.
    """
    import onnx_ir
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from peftc.backends.ort import OrtRunner
    from peftc.verification.compare import relative_error

    fused_path = path.with_name(f".fused.{path.name}")
    try:
        model = exported
        optimizer.optimize(model)
        model, counts = optimize_for_ort(model)
        counts["skip_layer_normalization"] = counts.get("skip_layer_normalization", 0) - _split_skip_norms(model)
        save(model, fused_path)
        expected = _expected(path, program, example)
        worst = relative_error(expected, OrtRunner(fused_path).run({k: v.numpy() for k, v in example.items()}))
        if not worst <= 1e-3:
            raise ValueError(f"the fused model differs from the unfused one by {worst:.3g} of an output's scale")
    except Exception as e:
        fused_path.unlink(missing_ok=True)
        unfused = onnx_ir.load(str(path))  # the fusions may have changed ``exported`` before failing
        return unfused, {}, (("onnxruntime fusions", f"kept the unfused model: {type(e).__name__}: {first_line(e)}"),)
    fused_path.replace(path)
    return model, {k: v for k, v in sorted(counts.items()) if v}, ()


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
