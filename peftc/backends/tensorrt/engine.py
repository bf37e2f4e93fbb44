"""Everything that runs the TensorRT library: ONNX parsing, engine build, run, refit (which module and
which GPU: ``install.py``).

Written against the TensorRT Python API so that it works with either module: ``tensorrt`` (TensorRT
10.12+/11) or ``tensorrt_rtx`` (TensorRT for RTX, pip ``tensorrt-rtx-cu13``). The differences used
here: TensorRT-RTX has no timing-cache tactics but a runtime (JIT kernel) cache, and builds for a list
of compute capabilities (``ComputeCapability.CURRENT`` = the GPU it is built on).

The ONNX parser runs on any machine with the module installed. Building an engine needs the CUDA
driver (``libcuda.so.1``) and a GPU; running one also needs device buffers, taken from a CUDA build of
torch. ``install.build_device`` says whether there is one TensorRT builds for and, if not, exactly why not.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peftc.backends.base import check_feeds
from peftc.backends.tensorrt.install import (  # re-exported: callers use engine.*
    Device,
    import_trt,
)
from peftc.errors import BackendUnavailable, InputError, UnsupportedError
from peftc.progress import advance

log = logging.getLogger(__name__)


class _Logger:
    """A TensorRT logger that keeps errors for the exception message and forwards the rest to logging."""

    def __new__(cls, trt: Any) -> Any:
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(msg)
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        return Logger()


@dataclasses.dataclass(frozen=True)
class ParseReport:
    """What TensorRT's ONNX parser made of a model: the network's inputs, outputs and layers."""

    module: str
    version: str
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]
    layers: int
    layer_types: Mapping[str, int]
    constants: frozenset[str]
    """Names of the network's constant layers: the parser names them after the ONNX initializers,
    and they are the weight names a refitter takes."""

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "version": self.version,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "layers": self.layers,
            "layer_types": dict(self.layer_types),
            "constant_layers": len(self.constants),
        }


def _network(trt: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any, Any]:
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise UnsupportedError(f"{onnx_path.name}: TensorRT's ONNX parser rejected it: {'; '.join(errors[:3])}")
    return builder, network, parser


def parse(onnx_path: Path, module: str | None = None) -> ParseReport:
    """Parse ``onnx_path`` with TensorRT's ONNX parser (no GPU needed) into a strongly typed network.

    Raises:
        UnsupportedError: the parser rejects the model (the message keeps its first errors).
    """
    trt = import_trt(module)
    logger = _Logger(trt)
    _, network, _ = _network(trt, logger, onnx_path)

    def describe(tensor: Any) -> dict[str, Any]:
        return {"name": tensor.name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}

    types: Counter[str] = Counter()
    constants = set()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        types[str(layer.type).rsplit(".", 1)[-1]] += 1
        if layer.type == trt.LayerType.CONSTANT:
            constants.add(layer.name)
    return ParseReport(
        module=trt.__name__,
        version=trt.__version__,
        inputs=tuple(describe(network.get_input(i)) for i in range(network.num_inputs)),
        outputs=tuple(describe(network.get_output(i)) for i in range(network.num_outputs)),
        layers=network.num_layers,
        layer_types=dict(sorted(types.items())),
        constants=frozenset(constants),
    )


Progress = Callable[[str], None]


def build(
    onnx_path: Path,
    profiles: Any,
    settings: Any,
    device: Device,
    progress: Progress,
    module: str | None = None,
) -> bytes:
    """Build a serialized engine (plan) from ``onnx_path``; GPU only.

    Args:
        profiles: ``InputProfile``s for the dynamic inputs (one optimization profile).
        settings: ``TensorRTSettings`` (refit mode, weight stripping, cache directory).
        device: the GPU (TensorRT-RTX builds for its compute capability).

    Raises:
        UnsupportedError: TensorRT could not build the engine (the message keeps its errors).
    """
    trt = import_trt(module)
    logger = _Logger(trt)
    builder, network, _ = _network(trt, logger, onnx_path)
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls miss the 1e-5 bound
    if settings.refit_mode == "refit":
        config.set_flag(trt.BuilderFlag.REFIT)
    elif settings.refit_mode == "refit_identical":
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if settings.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if hasattr(config, "num_compute_capabilities"):  # TensorRT-RTX: build for the GPU at hand
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
    dynamic = [p for p in profiles if p.min != p.max]
    if dynamic:
        profile = builder.create_optimization_profile()
        for p in profiles:
            profile.set_shape(p.name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    cache_file = _cache_file(settings, trt, "timing")
    cache = None
    if cache_file is not None and hasattr(config, "create_timing_cache"):
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    config.progress_monitor = _monitor(trt, progress)
    progress(
        f"tensorrt: building the engine on {device.name} (sm {device.compute_capability[0]}{device.compute_capability[1]})"
    )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UnsupportedError(f"TensorRT could not build the engine on {device.name}: {'; '.join(logger.errors[-3:])}")
    if cache is not None and cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(bytes(cache.serialize()))
    return bytes(plan)


def _cache_file(settings: Any, trt: Any, kind: str) -> Path | None:
    if not settings.cache_dir:
        return None
    return Path(settings.cache_dir) / f"{trt.__name__}-{trt.__version__}.{kind}.cache"


def _monitor(trt: Any, progress: Progress) -> Any:
    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.phase = (phase_name, num_steps)
                progress(f"tensorrt: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            name, steps = getattr(self, "phase", (None, 0))
            if phase_name == name:
                advance(step + 1, steps)
            return True

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


class TrtRunner:
    """Runs a serialized engine on CUDA device buffers (torch tensors); refits its weights.

    ``run`` takes and returns numpy arrays like every runner. Not safe to call concurrently with
    :meth:`refit`.
    """

    def __init__(
        self,
        plan: bytes,
        *,
        onnx_path: Path | None = None,
        stripped: bool = False,
        settings: Any = None,
        module: str | None = None,
    ) -> None:
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("running a TensorRT engine needs a CUDA build of torch (for device buffers)")
        trt = import_trt(module)
        self.trt = trt
        self.torch = torch
        self.logger = _Logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise InputError(f"the engine does not deserialize here: {'; '.join(self.logger.errors[-3:])}")
        if stripped:
            if onnx_path is None:
                raise InputError("a weight-stripped engine needs its ONNX to refit the weights from")
            self._refit_from_onnx(onnx_path)
        self.context = self._context(settings)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == inputs]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != inputs]

    def _context(self, settings: Any) -> Any:
        engine = self.engine
        if hasattr(engine, "create_runtime_config"):  # TensorRT-RTX: reuse JIT-compiled kernels
            runtime_config = engine.create_runtime_config()
            cache_file = _cache_file(settings, self.trt, "runtime") if settings is not None else None
            if cache_file is not None and hasattr(runtime_config, "create_runtime_cache"):
                cache = runtime_config.create_runtime_cache()
                if cache_file.is_file():
                    cache.deserialize(cache_file.read_bytes())
                runtime_config.set_runtime_cache(cache)
                self._runtime_cache = (cache, cache_file)
            return engine.create_execution_context(runtime_config)
        return engine.create_execution_context()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        check_feeds(feeds, self.input_names)
        keep = []
        for name in self.input_names:
            dtype = _torch_dtype(torch, self.engine.get_tensor_dtype(name))
            value = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", dtype)
            keep.append(value)
            self.context.set_input_shape(name, tuple(value.shape))
            if value.numel() == 0:  # an empty input (a generation step's past at prefill): any valid address
                keep.append(value := torch.empty(1, dtype=dtype, device="cuda"))
            self.context.set_tensor_address(name, value.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=_torch_dtype(torch, self.engine.get_tensor_dtype(name)), device="cuda")
            outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UnsupportedError(f"TensorRT failed to run the engine: {'; '.join(self.logger.errors[-3:])}")
        stream.synchronize()
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy() for k, v in outputs.items()}

    def refit(self, weights: Mapping[str, Any]) -> None:
        """Replace named engine weights (``name → torch tensor``); every name must be refittable.

        Raises:
            InputError: a name the engine does not know, or weights the refitter reports missing.
        """
        trt = self.trt
        refitter = trt.Refitter(self.engine, self.logger)
        known = set(refitter.get_all_weights())
        unknown = sorted(set(weights) - known)
        if unknown:
            raise InputError(f"the engine has no refittable weight(s) {unknown[:5]}; was it built with --refit?")
        held = []
        for name, tensor in weights.items():
            array = tensor.detach().cpu().contiguous()
            held.append(array)
            if array.dtype == self.torch.bfloat16:
                w = trt.Weights(trt.DataType.BF16, array.data_ptr(), array.numel())
            else:
                w = trt.Weights(np.ascontiguousarray(array.numpy()))
            refitter.set_named_weights(name, w)
        missing = list(refitter.get_missing_weights())
        if missing:
            raise InputError(
                f"refit incomplete: TensorRT still needs weights {missing[:5]} (+{max(0, len(missing) - 5)})"
            )
        if not refitter.refit_cuda_engine():
            raise InputError(f"TensorRT refused the refit: {'; '.join(self.logger.errors[-3:])}")

    def _refit_from_onnx(self, onnx_path: Path) -> None:
        trt = self.trt
        refitter = trt.Refitter(self.engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise InputError(f"{onnx_path}: refitting the stripped engine failed: {'; '.join(self.logger.errors[-3:])}")


def _dtype_name(dtype: Any) -> str:
    return {
        "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
        "INT32": "int32", "BOOL": "bool", "INT8": "int8", "UINT8": "uint8",
    }.get(str(dtype).rsplit(".", 1)[-1], str(dtype))  # fmt: skip


def _torch_dtype(torch: Any, dtype: Any) -> Any:
    return getattr(torch, _dtype_name(dtype))
