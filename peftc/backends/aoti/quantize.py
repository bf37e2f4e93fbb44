"""Integer precisions of the AOTInductor target on x86 CPUs, by torchao's PT2E flow.

===============  ==================================================  ===============================
precision        what is quantized                                   how
===============  ==================================================  ===============================
``int8``         weights per output channel (int8, symmetric) and    ``X86InductorQuantizer``,
                 activations per tensor at run time (uint8)          dynamic
``int8-static``  weights per output channel (int8, symmetric) and    ``X86InductorQuantizer``,
                 activations per tensor (uint8, ranges from the      static (histogram observers)
                 calibration inputs)
===============  ==================================================  ===============================

The layers are the model's ``nn.Linear`` and ``nn.Conv2d`` modules, by the weight they own: an
unmerged adapter's branch stays in float around its quantized base layer. torchao inserts
quantize/dequantize pairs around each quantized layer (``prepare_pt2e``, calibration,
``convert_pt2e``); Inductor's freezing turns each pair and its GEMM into one oneDNN int8 kernel
(VNNI/AMX) when the package is compiled. A trial of the layer search runs the converted program
eagerly (the same rounding, without the compile); only the chosen one is compiled, and the artifact
is then verified like any other.

Not offered, measured on torch 2.13 + torchao 0.18 (2-vCPU Xeon with AMX): weight-only int8/int4
(``Int8WeightOnlyConfig``/``Int4WeightOnlyConfig``) compile to kernels 20-60× slower than fp32 on
CPU with fp32 activations, and torchao's int4 CPU layout needs a CUDA extension; ``--target onnx``
has both (``MatMulNBits``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
import zipfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from peftc import ir
from peftc.backends.base import Feeds, Layer, Lowered, Run
from peftc.errors import BackendUnavailable
from peftc.loaders.inputs import InputSignature
from peftc.logs import quiet_imports

_LAYER_OPS = {torch.ops.aten.linear.default: torch.nn.Linear, torch.ops.aten.conv2d.default: torch.nn.Conv2d}
DYNAMIC = {"int8": True, "int8-static": False}


class AotiQuantizer:
    """A decomposed fp32 program, open for quantizing (a :class:`~peftc.backends.base.Quantizer`)."""

    def __init__(
        self, backend: Any, program: ir.Program, signature: InputSignature, directory: Path, precision: str
    ) -> None:
        self._backend, self._program, self._signature = backend, program, signature
        self._directory, self._dynamic = directory, DYNAMIC[precision]
        self._calibrated: dict[str, torch.nn.Module] | None = None
        self._inputs = ir.user_input_names(program)
        self._outputs = ir.output_names(program)
        self.layers = list(_layers(program.module()).values())

    def trial(self, keep: Collection[str], calibration: Feeds, only: Collection[str] | None = None) -> Run:
        converted = self._convert(keep, calibration, only)

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = converted(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
            leaves = pytree.tree_leaves(out)
            return {name: leaf.numpy() for name, leaf in zip(self._outputs, leaves, strict=True)}

        return run

    def write(self, keep: Collection[str], calibration: Feeds) -> Lowered:
        converted = self._convert(keep, calibration)
        signature = self._signature
        example = signature.example(signature.trace_sizes())
        exported = ir.trace(converted, example, signature.dynamic_shapes())
        with warnings.catch_warnings():  # Inductor's int8 lowering copies a tensor the way torch warns about
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            lowered = self._backend.compile(exported, self._program, signature, self._directory, lambda text: None)
        kernels = _int8_kernels(self._directory / lowered.files[0])
        return dataclasses.replace(lowered, info={**lowered.info, "int8_kernels": kernels})

    def _convert(self, keep: Collection[str], calibration: Feeds, only: Collection[str] | None = None) -> Any:
        """The program with the chosen layers quantized: annotated, observed, converted.

        Calibration runs the program in float with observers attached, so what an observer sees does
        not depend on which other layers are chosen: the static scheme calibrates once with every
        layer chosen and gives each trial's observers those states (an observer shared by several
        nodes would see more there, so a trial with one calibrates itself)."""
        with _imports():
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
        prepared = self._prepare(keep, only)
        if self._dynamic:
            self._observe(prepared, calibration[:1])  # activations are quantized at run time: weights only
            return convert_pt2e(prepared)
        if self._calibrated is None:
            self._calibrated = _observers(self._observe(self._prepare((), None), calibration)) or {}
        observers = _observers(prepared)
        if observers is not None and observers.keys() <= self._calibrated.keys():
            for name, observer in observers.items():
                observer.load_state_dict(self._calibrated[name].state_dict())
        else:
            self._observe(prepared, calibration)
        return convert_pt2e(prepared)

    def _prepare(self, keep: Collection[str], only: Collection[str] | None) -> Any:
        with _imports():
            from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
        module = self._program.module()
        chosen = {name for name in (only if only is not None else _layers(module)) if name not in keep}
        _mark(module, chosen)
        quantizer = X86InductorQuantizer()
        config = get_default_x86_inductor_quantization_config(is_dynamic=self._dynamic)
        for name in sorted(chosen):
            quantizer.set_module_name_qconfig(name, config)
        return prepare_pt2e(module, quantizer)

    def _observe(self, prepared: Any, feeds: Feeds) -> Any:
        with torch.no_grad():
            for feed in feeds:
                prepared(**{k: torch.from_numpy(np.ascontiguousarray(feed[k])) for k in self._inputs})
        return prepared


def _observers(prepared: torch.fx.GraphModule) -> dict[str, torch.nn.Module] | None:
    """The observers of a prepared program by the node each observes; None if one is shared."""
    out: dict[str, torch.nn.Module] = {}
    for node in prepared.graph.nodes:
        module = prepared.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None and hasattr(module, "calculate_qparams"):
            out[node.args[0].name] = module
    return out if len({id(m) for m in out.values()}) == len(out) else None


def _int8_kernels(package: Path) -> dict[str, int]:
    """How many oneDNN int8 GEMM/convolution calls the package's generated code makes (what freezing
    fused each quantized layer's quantize → op → dequantize into)."""
    with zipfile.ZipFile(package) as archive:
        code = "".join(
            archive.read(n).decode(errors="replace") for n in archive.namelist() if n.endswith("wrapper.cpp")
        )
    return {kind: len(re.findall(rf"_{kind}\w*_pointwise\w*\(", code)) for kind in ("qlinear", "qconv")}


def _layers(module: torch.fx.GraphModule) -> dict[str, Layer]:
    """Module name → layer, for each linear/conv2d node whose weight its own module owns."""
    out = {}
    for node in module.graph.nodes:
        owner = _owner(node)
        if owner and owner not in out:
            weight = node.args[1].meta["val"]
            out[owner] = Layer(owner, str(node.target.overloadpacket.__name__), owner, tuple(weight.shape))
    return out


def _owner(node: torch.fx.Node) -> str | None:
    """The module a linear/conv2d node is the layer of: the innermost module of its call, if it owns
    the weight (a ``get_attr`` named ``{module}.weight``); None for any other node."""
    if node.op != "call_function" or node.target not in _LAYER_OPS:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0].removeprefix("L['self'].")
    weight = node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or weight.target != f"{path}.weight":
        return None
    return path


def _mark(module: torch.fx.GraphModule, chosen: Collection[str]) -> None:
    """Tell torchao's pattern matcher (``get_source_partitions``) which nodes are the chosen layers:
    each such node alone is its module's partition; every other node is a partition of no kind it
    quantizes (an unmerged adapter's branch inside a quantized module stays in float)."""
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        owner = _owner(node)
        if owner in chosen:
            node.meta["source_fn_stack"] = [(owner, _LAYER_OPS[node.target])]
        else:
            node.meta["source_fn_stack"] = [(node.name, node.target)]


@contextlib.contextmanager
def _imports() -> Iterator[None]:
    try:
        with quiet_imports():
            yield
    except ImportError as e:
        raise BackendUnavailable(
            f"integer precisions on aoti need torchao (pip install 'torchao>=0.18,<0.19'): {e}"
        ) from None
