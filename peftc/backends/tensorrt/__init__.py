"""The TensorRT target (``--target trt``): the core's ONNX, parsed and built by TensorRT or TensorRT-RTX.

Lowering, in order:

1. the ONNX backend lowers the program exactly as for ``--target onnx`` (``model.onnx``, the same
   peftc-named initializers); for ``--precision fp16|bf16`` a cast copy ``model.<precision>.onnx`` is
   what TensorRT consumes (``precision.py``);
2. TensorRT's ONNX parser parses it into a strongly typed network, on any machine (the parse report:
   inputs, outputs, layer counts, goes into the manifest), and the refit map
   (``refit.py``) is checked against the network's named weights;
3. on a machine with a GPU the engine is built (``model.engine``) with the profile, precision and refit
   settings (``settings.py``), and verified against eager PyTorch like every target. Without a GPU the
   artifact keeps the ONNX and the parse report, its ONNX is verified with onnxruntime instead, and
   ``not_run`` records ``engine not built: no GPU (…)`` with the precise reason.

**An artifact without an engine is not runnable as TensorRT**: ``peftc.load`` refuses it with a message
saying why and how to run the verified ONNX inside (``peftc.load(out, runtime="onnx")``). A production
app that asked for TensorRT must never get onnxruntime silently; one that wants the CPU fallback asks
for it by name.

``--target trt`` with neither ``tensorrt`` nor ``tensorrt_rtx`` installed is refused before any work
(nothing is written); the message names the extra and that ``--target onnx`` builds the same ONNX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peftc.artifact.files import listed, read_verified, records
from peftc.backends.base import Availability, Capabilities, Lowered, LowerRequest
from peftc.backends.tensorrt import engine as trt_engine
from peftc.backends.tensorrt import install as trt_install
from peftc.backends.tensorrt.refit import BASE_FILE, RefitMap, base_weights, build_refit_map, refit_weights
from peftc.backends.tensorrt.settings import (
    TensorRTSettings,
    check_precision,
    dim_profiles,
    input_profiles,
)
from peftc.errors import BackendUnavailable, InputError, VerificationError
from peftc.loaders.inputs import InputSignature

ENGINE_FILE = "model.engine"
ONNX_FILE = "model.onnx"
OPTIONS = frozenset({"profile", "precision", "refit", "strip_weights", "cache_dir"})


class TensorRTBackend:
    """Lower to a TensorRT engine (through the ONNX backend); run it on a CUDA device."""

    name = "trt"
    capabilities = Capabilities(
        dynamic_shapes=True,
        adapter_swap=True,
        device="cuda",
        precisions={"fp32": "program", "fp16": "option", "bf16": "option"},
    )
    requires = f"tensorrt or tensorrt_rtx ({trt_install.INSTALL_HINT}), and an NVIDIA GPU it builds engines for"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        unknown = sorted(set(options or {}) - OPTIONS)
        if unknown:
            raise InputError(f"target 'trt' has no option(s) {unknown}; it takes {sorted(OPTIONS)}")
        self.settings = TensorRTSettings.from_options(options or {})

    def available(self) -> Availability:
        module = trt_install.find_module()
        if module is None:
            return Availability(
                False,
                f"neither tensorrt nor tensorrt_rtx is installed ({trt_install.INSTALL_HINT}); nothing was built: "
                "--target onnx builds the ONNX model this target would consume",
            )
        return Availability(True)

    def versions(self) -> dict[str, str]:
        from peftc.backends.onnx import OnnxBackend

        trt = trt_install.import_trt()
        return {**OnnxBackend().versions(), trt.__name__: trt.__version__}

    def lower(self, request: LowerRequest, directory: Path, progress: Any) -> Lowered:
        """Lower through ONNX, parse (and with a GPU, build) the engine; the request's ``reference``
        (the program with sites unmerged) says how each weight was adapted, for the refit map."""
        program, signature = request.program, request.signature
        reference = request.reference or program
        import onnx

        from peftc.backends.tensorrt.quantized import refuse_contrib_layers

        refuse_contrib_layers(program)  # before any export: TensorRT cannot parse onnxruntime's contrib ops

        from peftc.backends.onnx import OnnxBackend

        settings = self.settings
        dims = dim_profiles(signature, settings.profiles)  # bad profiles fail before any export
        profiles = input_profiles(signature, dims)
        onnx_lowered = OnnxBackend(fuse=False).lower(LowerRequest(program, signature), directory, progress)
        engine_onnx = directory / ONNX_FILE
        if settings.precision != "fp32":
            from peftc.backends.tensorrt.precision import cast_model

            progress(f"tensorrt: cast the network to {settings.precision}")
            engine_onnx = cast_model(directory / ONNX_FILE, settings.precision)
        progress(f"tensorrt: parse {engine_onnx.name} with TensorRT's ONNX parser")
        report = trt_engine.parse(engine_onnx)
        _check_parse(report, onnx_lowered)
        model = onnx.load(str(engine_onnx), load_external_data=False)
        refit_map = build_refit_map(reference, program, {i.name for i in model.graph.initializer})
        refit_map = _against_network(refit_map, report)
        not_run: list[tuple[str, str]] = []
        device, why = trt_install.build_device(report.module)
        engine_file = None
        if settings.refit:
            from safetensors.torch import save_file

            save_file(base_weights(reference, refit_map), str(directory / BASE_FILE))
        if device is None:
            not_run.append(("tensorrt engine build and run", f"engine not built: {why}"))
        else:
            check_precision(settings.precision, device.compute_capability, device.name)
            plan = trt_engine.build(engine_onnx, profiles, settings, device, progress, report.module)
            (directory / ENGINE_FILE).write_bytes(plan)
            engine_file = ENGINE_FILE
        files = sorted(p.name for p in directory.iterdir() if p.is_file())
        compute = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}[settings.precision]
        outputs = tuple(
            {**o, "compute_dtype": compute} if compute and o["dtype"] == "float32" else o for o in onnx_lowered.outputs
        )
        info = {
            **onnx_lowered.info,
            "tensorrt": {
                "module": report.module,
                "version": report.version,
                "settings": settings.to_json(),
                "profile": [p.to_json() for p in profiles],
                "onnx": engine_onnx.name,
                "engine": engine_file,
                "engine_missing": None if engine_file else f"engine not built: {why}",
                "device": dataclasses.asdict(device) if device else None,
                "parse": report.to_json(),
                "refit_map": refit_map.to_json(),
                "refit_base": BASE_FILE if settings.refit else None,
            },
            "runnable_with": ["onnx"],
        }
        return Lowered(
            files=tuple(files),
            inputs=onnx_lowered.inputs,
            outputs=outputs,
            info=info,
            not_run=tuple(not_run),
            verify_with=None if engine_file else "onnx",
        )

    def load(self, directory: Path, target: Mapping[str, Any]) -> TensorRTRunner:
        info = target.get("tensorrt") or {}
        if not info.get("engine"):
            reason = info.get("engine_missing") or "engine not built"
            raise BackendUnavailable(
                f"{directory}: no TensorRT engine in this artifact ({reason}); its {ONNX_FILE} was verified with "
                "onnxruntime: run that with peftc.load(path, runtime='onnx'), or compile again on a GPU machine"
            )
        return TensorRTRunner(Path(directory), target)


@dataclasses.dataclass
class TensorRTRunner:
    """A built engine plus what refitting it needs (the refit map and base weights in the artifact)."""

    directory: Path
    target: Mapping[str, Any]

    def __post_init__(self) -> None:
        info = self.target["tensorrt"]
        settings = TensorRTSettings.from_options({k: v for k, v in info["settings"].items() if k != "profiles"})
        self.engine = trt_engine.TrtRunner(
            self._verified(info["engine"]),
            onnx_path=listed(self.directory, self.target, info["onnx"]),
            stripped=settings.strip_weights,
            settings=settings,
            module=info["module"],
        )
        self.input_names = self.engine.input_names
        self.output_names = self.engine.output_names
        self.refit_map = RefitMap.from_json(info["refit_map"])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine.run(feeds)

    def _verified(self, name: str) -> bytes:
        """The bytes of the artifact file ``name``, checked against the manifest as they are read (a file
        replaced after ``peftc.load`` is refused, not used)."""
        return read_verified(listed(self.directory, self.target, name), records(self.target)[name])

    def refit_adapter(self, adapters: Mapping[str, Mapping[str, Any]], *, verify: bool = True) -> None:
        """Refit the engine for new adapter tensors: ``adapter name → safetensors key → tensor``.

        Every weight comes from the base weights and the new adapter (never from the engine's current
        state); the refitter must report no missing weight, and the refitted engine is checked against
        onnxruntime running the artifact's ONNX with the same weights.

        Raises:
            InputError: the artifact is not refittable, or the adapter's tensors do not match its slots.
            VerificationError: the refitted engine disagrees with the ONNX reference.
        """
        from safetensors.torch import load

        info = self.target["tensorrt"]
        if not info.get("refit_base"):
            raise InputError(f"{self.directory}: built without --refit; recompile with --refit to swap adapters")
        base = load(self._verified(info["refit_base"]))
        weights = refit_weights(self.refit_map, base, adapters)
        precision = {"fp16": "float16", "bf16": "bfloat16"}.get(info["settings"]["precision"])
        self.engine.refit(
            {
                k: v.to(v.dtype if precision is None or not v.is_floating_point() else _torch(precision))
                for k, v in weights.items()
            }
        )
        if verify:
            self._check_against_onnx(weights)

    def _check_against_onnx(self, weights: Mapping[str, Any]) -> None:
        from peftc.verification import compare, output_dtypes

        signature = InputSignature.from_json(self.target["signature"])
        inputs = {k: v.numpy() for k, v in signature.example(signature.cases(1)[0], seed=0).items()}
        # the checked bytes; a model over 2 GB keeps its weights beside it, which onnxruntime reads itself
        external = self.target.get("external_data")
        model = listed(self.directory, self.target, ONNX_FILE) if external else self._verified(ONNX_FILE)
        expected = onnx_with_weights(model, weights, inputs)
        results = compare(expected, self.run(inputs), output_dtypes(self.target["outputs"]))
        bad = [r for r in results if not r.ok]
        if bad:
            raise VerificationError(
                f"refitted engine disagrees with onnxruntime on {bad[0].name}: max rel {bad[0].max_rel:.3g}"
            )


def onnx_with_weights(
    model: Path | bytes, weights: Mapping[str, Any], feeds: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Run ``model`` (a path, or the model's bytes) in onnxruntime with initializers replaced by ``weights``
    (``name → torch tensor``).

    Graph optimizations are off: onnxruntime folds constants before it applies overrides otherwise.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    held = []
    for name, tensor in weights.items():
        tensor = tensor.detach()
        array = (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        held.append(value)
        options.add_initializer(name, value)
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, dict(feeds)), strict=True))


def _torch(dtype: str) -> Any:
    import torch

    return getattr(torch, dtype)


def _check_parse(report: trt_engine.ParseReport, lowered: Lowered) -> None:
    """The parsed network has the ONNX model's inputs and outputs, by name."""
    want_in = [i["name"] for i in lowered.inputs]
    want_out = [o["name"] for o in lowered.outputs]
    got_in = [i["name"] for i in report.inputs]
    got_out = [o["name"] for o in report.outputs]
    if got_in != want_in or got_out != want_out:
        raise AssertionError(f"TensorRT parsed inputs {got_in} / outputs {got_out}, expected {want_in} / {want_out}")


def _against_network(refit_map: RefitMap, report: trt_engine.ParseReport) -> RefitMap:
    """Keep entries whose weight the parsed network names; refuse the others with the reason."""
    kept = tuple(e for e in refit_map.entries if e.weight in report.constants)
    lost = tuple(
        (e.weight, "TensorRT's parser did not keep it as a named weight")
        for e in refit_map.entries
        if e.weight not in report.constants
    )
    return RefitMap(kept, tuple(sorted(refit_map.refused + lost)))
