"""Integer precisions of the ONNX target, by onnxruntime's own quantizers.

==============  =====================================================  ==========================
precision       what is quantized                                      onnxruntime tool, ops
==============  =====================================================  ==========================
``int8``        weights per output channel (int8, symmetric) and       ``quantize_dynamic``:
                activations per tensor at run time (uint8)             MatMulInteger, QAttention,
                                                                       embedding tables (Gather)
``int8-static`` weights per channel and activations per tensor, both   ``quantize_static`` (QDQ,
                int8, activation ranges from calibration inputs        S8S8, MinMax): MatMul, Gemm,
                                                                       Conv
``int8-weight`` weights only, int8 in blocks of 32 along K, symmetric  ``MatMulNBitsQuantizer``:
``int4``        weights only, int4 in blocks of 32 along K, symmetric  ``MatMulNBits`` (MatMul)
==============  =====================================================  ==========================

A quantizer rewrites only ops whose weight is an initializer; ``MatMulNBits`` runs with
``accuracy_level=4`` (activations to int8 per block inside the kernel: onnxruntime's fast CPU path).
Every candidate op is a :class:`~peftc.backends.base.Layer` named after its ONNX node, with the
PyTorch module it came from (the exporter's ``namespace`` metadata) so a report can name it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftc.backends.base import Feeds, Layer, Lowered, Run
from peftc.logs import quiet

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Attention": 1, "Gather": 0}
SCHEMES: dict[str, dict[str, Any]] = {
    "int8": {"kind": "dynamic", "ops": ("MatMul", "Gemm", "Attention", "Gather")},
    "int8-static": {"kind": "static", "ops": ("MatMul", "Gemm", "Conv")},
    "int8-weight": {"kind": "nbits", "bits": 8, "ops": ("MatMul",)},
    "int4": {"kind": "nbits", "bits": 4, "ops": ("MatMul",)},
}
BLOCK = 32


class OnnxQuantizer:
    """The ONNX file ``lower`` wrote at ``path``, open for quantizing (a :class:`~peftc.backends.base.Quantizer`):
    moved into ``scratch`` and prepared; trials are quantized files there, each run by onnxruntime; the
    static scheme's activation ranges are computed once and reused."""

    def __init__(self, backend: Any, lowered: Lowered, path: Path, precision: str, scratch: Path) -> None:
        self._backend, self._lowered, self._path, self._precision = backend, lowered, path, precision
        self._scratch, self._cache = scratch, scratch / "calibration.json"
        self._src = scratch / "fp32" / path.name
        self._src.parent.mkdir()
        shutil.move(path, self._src)
        prepare(self._src)
        self.layers = quantizable(self._src, precision)

    def trial(self, keep: Collection[str], calibration: Feeds, only: Collection[str] | None = None) -> Run:
        trial = self._scratch / "trial"
        trial.mkdir(exist_ok=True)
        quantize(self._src, trial / self._path.name, self._precision, keep, calibration, self._cache, only)
        from peftc.backends.ort import OrtRunner  # a scratch model of this compile, not an artifact

        return OrtRunner(trial / self._path.name).run

    def write(self, keep: Collection[str], calibration: Feeds) -> Lowered:
        quantize(self._src, self._path, self._precision, keep, calibration, self._cache)
        return dataclasses.replace(self._lowered, info={**self._lowered.info, **self._backend.describe(self._path)})


def prepare(path: Path) -> None:
    """Fold constant subgraphs that feed weights (the fused Attention's concatenated Q/K/V weight) into
    initializers, in place, so the quantizers see them; onnxruntime folds the same at load time."""
    import onnx_ir
    from onnxscript.optimizer import fold_constants

    model = onnx_ir.load(str(path))
    fold_constants(model, input_size_limit=2**31, output_size_limit=2**31)
    onnx_ir.save(model, str(path))


def quantizable(path: Path, precision: str) -> list[Layer]:
    """The ops of the model at ``path`` that ``precision``'s quantizer rewrites, in graph order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if node.op_type not in SCHEMES[precision]["ops"] or index is None or len(node.input) <= index:
            continue
        shape = weights.get(node.input[index])
        if shape is None or len(shape) < 2:
            continue
        if node.op_type == "MatMul" and SCHEMES[precision]["kind"] == "nbits" and shape[0] % BLOCK:
            continue
        if node.op_type == "Attention" and any(a.name == "qkv_hidden_sizes" for a in node.attribute):
            continue  # QAttention takes one Q/K/V width only (onnxruntime's quantizer leaves these in float)
        layers.append(Layer(node.name, node.op_type, _module(node), shape))
    return layers


def quantize(
    src: Path,
    dst: Path,
    precision: str,
    keep: Collection[str],
    calibration: Sequence[Mapping[str, np.ndarray]],
    cache: Path,
    only: Collection[str] | None = None,
) -> None:
    """Write ``src`` quantized as ``precision`` to ``dst``, leaving the nodes in ``keep`` in float
    (``only``: quantize just these). ``cache`` holds the static scheme's calibration ranges, computed
    from ``calibration`` the first time and reused."""
    scheme = SCHEMES[precision]
    keep = _aliases(keep)
    nodes = _aliases(only) if only is not None else None
    with _quiet():
        if scheme["kind"] == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                src, dst, op_types_to_quantize=list(scheme["ops"]), per_channel=True, weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes, nodes_to_exclude=list(keep),
            )  # fmt: skip
        elif scheme["kind"] == "static":
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

            quantize_static(
                src, dst, _Reader(calibration), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(scheme["ops"]),
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes, nodes_to_exclude=list(keep), calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=cache,
            )  # fmt: skip
        else:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            model = onnx.load(str(src))
            if nodes is not None:  # its nodes_to_include adds to the op types rather than restricting them
                keep = [node.name for node in model.graph.node if node.name not in nodes]
            config = DefaultWeightOnlyQuantConfig(
                block_size=BLOCK, is_symmetric=True, accuracy_level=4, bits=scheme["bits"]
            )
            quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(keep), algo_config=config)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), False)


def _aliases(names: Collection[str]) -> list[str]:
    """``names`` and the names the dynamic quantizer gives the MatMul it makes of a Gemm first."""
    return [alias for name in names for alias in (name, f"{name}_MatMul")]


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(next(self._feeds, None) or {}) or None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(lambda: self.get_next(), None)


def _quiet() -> contextlib.AbstractContextManager[None]:
    """onnxruntime's quantizers log every node at INFO and advise pre-processing at WARNING."""
    return quiet("", "onnxruntime.quantization.matmul_nbits_quantizer")


def _module(node: Any) -> str:
    """The PyTorch module an exported node came from (``encoder.layer.0.output.dense``), or ''."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    scopes = [part.partition(": ")[0] for part in namespace.split("/")[1:-1]]
    return scopes[-1] if scopes else ""
