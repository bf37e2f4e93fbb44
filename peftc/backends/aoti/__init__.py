"""The AOTInductor target (``--target aoti``): a compiled ``.pt2`` package for CPU or CUDA.

Lowering decomposes the remaining call-site ops into their eager bodies (``SiteOp.body``, so the
reference math is the compiled math), moves the program to the device, and runs ``torch._inductor.aoti_compile_and_package`` (C++ for CPU, with gcc; Triton
kernels for CUDA). The package is loaded with ``torch._inductor.aoti_load_package`` and run through
its flat ``boxed_run`` entry, inputs in the program's own order and outputs named like every target.

Each compile runs in its own Inductor cache directory, deleted afterwards: Inductor rewrites a
graph's metadata files in the shared cache while packaging reads them, so two compiles of one graph
at once (two users, two test workers) could package an empty JSON file. Compiling costs the same
either way; nothing is reused across graphs that differ.

Parameters stay *constants* of the package under their state-dict keys, so adapter tensors are named
constants too; the manifest maps them to where they came from (``target.adapter_constants``: source,
shape and dtype). Merged and unmerged packages are compiled with Inductor's freezing (``frozen`` in
the manifest: weights, adapter tensors included, folded into the package and pre-packed for oneDNN;
Inductor freezes only with grad off, hence the ``no_grad``); swappable ones without, so their slots
stay plain constants ``load_constants`` fills.

A ``--swappable`` artifact's adapter slots are such constants, and its adapters are safetensors files
of slot values. Its runner is a :class:`~peftc.backends.base.SlotRunner`: ``run(feeds, slots)``
loads the slot values into the package with ``load_constants`` (only when they are not the ones
loaded) and runs; values are always loaded whole, never patched, so A → B → A gives A's outputs bit
for bit. The package holds one set of constants, so a lock serializes such calls: a call never sees
another call's slots.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc import ir
from peftc.artifact.files import listed
from peftc.backends.base import Availability, Capabilities, Lowered, LowerRequest, check_feeds
from peftc.errors import BackendUnavailable, InputError
from peftc.loaders.inputs import InputSignature
from peftc.methods import registry

PACKAGE_FILE = "model.pt2"
DEVICES = ("cpu", "cuda")
OPTIONS = frozenset({"device"})


def cpp_compiler() -> str:
    """The C++ compiler Inductor runs for CPU code: ``$CXX``, else its platform default."""
    return os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


class AotiBackend:
    """Compile with AOTInductor; run the package in this process."""

    name = "aoti"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise InputError(f"target 'aoti' has no option(s) {unknown}; it takes {sorted(OPTIONS)}")
        self.device = options.get("device") or "cpu"
        if self.device not in DEVICES:
            raise InputError(f"--device {self.device!r}: use one of {', '.join(DEVICES)}")
        precisions = dict.fromkeys(("fp32", "bf16", "fp16"), "program")
        if self.device == "cpu":
            precisions |= dict.fromkeys(("int8", "int8-static"), "quantize")
        hint = (
            "weight-only int8/int4 have no fast AOTInductor CPU kernel with float activations (README: "
            "Precision and speed); --target onnx quantizes weights only"
            if self.device == "cpu"
            else "AOTInductor's int8 kernels are x86 CPU ones (--device cpu)"
        )
        self.capabilities = Capabilities(
            dynamic_shapes=True, adapter_swap=True, device=self.device, precisions=precisions, precision_hint=hint
        )
        self.requires = f"torch with Inductor and a C++ compiler ({cpp_compiler()})" + (
            ", and a CUDA GPU torch can use" if self.device == "cuda" else ""
        )

    adapter_suffix = ".safetensors"

    def write_adapter(self, path: Path, tensors: Mapping[str, np.ndarray]) -> None:
        """Write slot values as a safetensors file (read memory-mapped by the runner)."""
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))

    def available(self) -> Availability:
        if self.device == "cuda" and not torch.cuda.is_available():
            return Availability(False, f"--device cuda: torch {torch.__version__} sees no CUDA device here")
        if self.device == "cpu" and importlib.util.find_spec("torch._inductor") is None:
            return Availability(False, "torch was built without Inductor")
        if shutil.which(compiler := cpp_compiler()) is None:
            return Availability(
                False, f"no C++ compiler: AOTInductor builds packages with {compiler!r} (install it, or set CXX)"
            )
        return Availability(True)

    def versions(self) -> dict[str, str]:
        out = {"torch": torch.__version__}
        if self.device == "cuda":
            out["cuda"] = str(torch.version.cuda)
            out["gpu"] = torch.cuda.get_device_name(0)
        return out

    def lower(self, request: LowerRequest, directory: Path, progress: Any) -> Lowered:
        """Compile the package; ``overridable`` tensors (adapter slots) must stay package constants.
        An integer ``precision`` is compiled by the quantizer: the program is left pending for it."""
        program, signature, overridable = request.program, request.signature, request.overridable
        decomposed = program.run_decompositions(decompositions())
        if self.capabilities.precisions.get(request.precision) == "quantize":
            return Lowered((), tuple(_describe_inputs(signature)), (), {}, pending=(decomposed, signature))
        if self.device != "cpu":
            from torch.export.passes import move_to_device_pass

            # "cuda:N", not "cuda": the pass writes the string into device kwargs (aten._assert_tensor_metadata)
            # while fake tensors moved with it report cuda:N, and Inductor then refuses the mismatch.
            decomposed = move_to_device_pass(decomposed, f"cuda:{torch.cuda.current_device()}")
        return self.compile(decomposed, program, signature, directory, progress, overridable)

    def compile(
        self,
        compiled: ir.Program,
        program: ir.Program,
        signature: InputSignature,
        directory: Path,
        progress: Any,
        overridable: tuple[str, ...] = (),
    ) -> Lowered:
        """Compile ``compiled`` (``program`` decomposed, moved, or quantized) into ``directory``."""
        progress(f"aoti: compiling for {self.device} with AOTInductor (tens of seconds)")
        path = directory / PACKAGE_FILE
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

        # Inductor freezes (folds weights into the package and pre-packs them for oneDNN) only with
        # grad off; adapter slots must stay settable constants, so swappable packages are not frozen.
        with (
            tempfile.TemporaryDirectory(prefix="peftc-inductor-") as cache,
            temporary_cache_dir(cache),
            torch.no_grad(),
        ):
            torch._inductor.aoti_compile_and_package(
                compiled, package_path=str(path), inductor_configs={"freezing": not overridable}
            )
        loaded = torch._inductor.aoti_load_package(str(path))
        constants = set(loaded.get_constant_fqns())
        missing = sorted(set(overridable) - constants)
        if missing:
            raise AssertionError(f"adapter slot {missing[0]} was folded into the package; it cannot be swapped")
        adapter_constants, folded = _adapter_constants(program, constants)
        frozen = not overridable
        info = {
            "package": PACKAGE_FILE,
            "device": self.device,
            "frozen": frozen,
            "input_order": ir.user_input_names(program),
            "output_order": ir.output_names(program),
            "constants": len(constants),
            "adapter_constants": adapter_constants,
        }
        # Frozen packages fold weights, adapter tensors included: that is the point of freezing.
        not_run = (
            () if frozen else tuple(("adapter swap", f"adapter tensor {f} was folded by Inductor") for f in folded[:1])
        )
        return Lowered(
            files=(PACKAGE_FILE,),
            inputs=tuple(_describe_inputs(signature)),
            outputs=tuple(_describe_outputs(program, signature)),
            info=info,
            not_run=not_run,
        )

    def quantizer(self, lowered: Lowered, directory: Path, precision: str, scratch: Path) -> Any:
        """``peftc/backends/aoti/quantize.py`` (a :class:`~peftc.backends.base.QuantizingBackend`)."""
        from peftc.backends.aoti.quantize import AotiQuantizer

        program, signature = lowered.pending
        return AotiQuantizer(self, program, signature, directory, precision)

    def load(self, directory: Path, target: Mapping[str, Any]) -> AotiRunner:
        return AotiRunner(listed(directory, target, target.get("package", PACKAGE_FILE)), target)


def decompositions() -> dict[Any, Any]:
    """Decomposition table for ``run_decompositions``: every call-site op and quantized-layer op → its eager body."""
    from peftc.quant.ops import OPS as QUANT_OPS

    return {op.overload: op.body for op in [*registry.site_ops().values(), *QUANT_OPS] if op.form == "call"}


class AotiRunner:
    """A loaded AOTInductor package. ``run`` takes and returns numpy arrays; it may be called from
    several threads (calls that set slots are serialized, see the module docstring)."""

    def __init__(self, path: Path, target: Mapping[str, Any]) -> None:
        self.device = target.get("device", "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"{path}: compiled for CUDA, and torch sees no CUDA device here")
        import peftc.methods.registry  # noqa: F401  (a package may call peftc ops that were left undecomposed)

        self.model = torch._inductor.aoti_load_package(str(path))
        self.input_names: list[str] = list(target["input_order"])
        self._dtypes = {i["name"]: getattr(torch, i["dtype"]) for i in target.get("inputs", ()) if i.get("dtype")}
        self.output_names: list[str] = list(target["output_order"])
        self._active: Any = None
        self._lock = threading.Lock()

    def load_slots(self, path: Path) -> dict[str, np.ndarray]:
        """A safetensors adapter file's values (memory-mapped)."""
        return self.slot_values(path)

    def load_values(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Slot values as ``run`` takes them."""
        return dict(values)

    def slot_values(self, path: Path) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(path))

    def run(
        self, feeds: Mapping[str, np.ndarray], slots: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Run on ``feeds``; with ``slots`` (constant → array), those constants loaded first."""
        if slots is None:
            return self._run(feeds)
        with self._lock:
            if slots is not self._active:
                constants = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in slots.items()}
                self.model.load_constants(constants, check_full_update=False)
                self._active = slots
            return self._run(feeds)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(feeds, self.input_names)
        outputs = self.run_tensors({n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names})
        return {
            name: (value.float() if value.dtype == torch.bfloat16 else value).cpu().numpy()
            for name, value in outputs.items()
        }

    def run_tensors(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on tensors, unchecked: each cast to the package's dtype for it (no copy when it already is
        one, e.g. a bf16 package's own ``present.*`` fed back as its next step's caches); the outputs as
        the package returns them (a bf16 package's in bf16). ``runner.generate``'s decode steps."""
        flat = [feeds[n].to(self.device, self._dtypes.get(n)) for n in self.input_names]
        with torch.no_grad():
            outputs = self.model.loader.boxed_run(flat)
        return dict(zip(self.output_names, outputs, strict=True))


def _adapter_constants(program: ir.Program, constants: set[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Adapter placeholder → ``{source, shape, dtype}`` for those that are package constants."""
    out: dict[str, dict[str, Any]] = {}
    folded = []
    state = {**program.state_dict, **program.constants}
    for node in program.graph.nodes:
        info = node.meta.get(ir.meta.PEFTC, {}) if node.op == "placeholder" else {}
        fqn = ir.placeholder_fqn(program, node) if "source" in info else None
        if fqn is None:
            continue
        if fqn not in constants:
            folded.append(fqn)
            continue
        tensor = state[fqn]
        out[fqn] = {
            "source": info["source"],
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
        }
    return out, folded


def _describe_inputs(signature: InputSignature) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in signature.inputs]


def _describe_outputs(program: ir.Program, signature: InputSignature) -> list[dict[str, Any]]:
    """Output names, dtypes and shapes, dynamic dims named after the signature's (``batch``, ``seq``)."""
    symbols: dict[str, str] = {}
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec in signature.inputs:
        node = nodes.get(spec.name)
        value = node.meta.get("val") if node is not None else None
        for dim, want in zip(getattr(value, "shape", ()), spec.shape, strict=False):
            if isinstance(want, str) and not isinstance(dim, int):
                symbols[str(dim)] = want
    output = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta.get("val") if hasattr(a, "meta") else None for a in output.args[0]]
    out = []
    for name, value in zip(ir.output_names(program), values[-len(ir.output_names(program)) :], strict=True):
        shape = [d if isinstance(d, int) else symbols.get(str(d), str(d)) for d in getattr(value, "shape", ())]
        dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
        out.append({"name": name, "dtype": dtype, "shape": shape})
    return out
