"""The AOTInductor target (``--target aoti``): a compiled ``.pt2`` package for CPU or CUDA.

Lowering decomposes the remaining call-site ops to ATen (``translations.py``), moves the program to
the device, and runs ``torch._inductor.aoti_compile_and_package`` (C++ for CPU, with gcc; Triton
kernels for CUDA). The package is loaded with ``torch._inductor.aoti_load_package`` and run through
its flat ``boxed_run`` entry, inputs in the program's own order and outputs named like every target.

Each compile runs in its own Inductor cache directory, deleted afterwards: Inductor rewrites a
graph's metadata files in the shared cache while packaging reads them, so two compiles of one graph
at once (two users, two test workers) could package an empty JSON file. Compiling costs the same
either way; nothing is reused across graphs that differ.

Parameters stay *constants* of the package under their state-dict keys (Inductor does not freeze
them by default), so adapter tensors are named constants too; the manifest maps them to where they
came from (``target.adapter_constants``: source, shape and dtype).

A ``--swappable`` artifact's adapter slots are such constants, and its adapters are safetensors files
of slot values. A call with ``adapter=name`` loads that adapter's values into the slots (only when
they are not the ones loaded) with the package's ``load_constants`` and runs; slot values are always
loaded whole, from the file, never patched, so A → B → A gives A's outputs bit for bit. The package
holds one set of constants, so a lock serializes calls: a call never sees another call's adapter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc import ir
from peftc.backends import banks
from peftc.backends.base import Availability, Capabilities, Lowered, check_feeds
from peftc.errors import BackendUnavailable, InputError
from peftc.loaders.inputs import InputSignature

PACKAGE_FILE = "model.pt2"
DEVICES = ("cpu", "cuda")
OPTIONS = frozenset({"device"})


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
        self.capabilities = Capabilities(dynamic_shapes=True, adapter_swap=True, device=self.device, slots=True)

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
        return Availability(True)

    def versions(self) -> dict[str, str]:
        out = {"torch": torch.__version__}
        if self.device == "cuda":
            out["cuda"] = str(torch.version.cuda)
            out["gpu"] = torch.cuda.get_device_name(0)
        return out

    def lower(
        self,
        program: ir.Program,
        signature: InputSignature,
        directory: Path,
        progress: Any,
        overridable: Sequence[str] = (),
    ) -> Lowered:
        """Compile the package; ``overridable`` tensors (adapter slots) must stay package constants."""
        from peftc.backends.aoti.translations import table

        decomposed = program.run_decompositions(table())
        if self.device != "cpu":
            from torch.export.passes import move_to_device_pass

            decomposed = move_to_device_pass(decomposed, self.device)
        progress(f"aoti: compiling for {self.device} with AOTInductor (tens of seconds)")
        path = directory / PACKAGE_FILE
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

        with tempfile.TemporaryDirectory(prefix="peftc-inductor-") as cache, temporary_cache_dir(cache):
            torch._inductor.aoti_compile_and_package(decomposed, package_path=str(path))
        loaded = torch._inductor.aoti_load_package(str(path))
        constants = set(loaded.get_constant_fqns())
        missing = sorted(set(overridable) - constants)
        if missing:
            raise AssertionError(f"adapter slot {missing[0]} was folded into the package; it cannot be swapped")
        adapter_constants, folded = _adapter_constants(program, constants)
        info = {
            "package": PACKAGE_FILE,
            "device": self.device,
            "input_order": ir.user_input_names(program),
            "output_order": ir.output_names(program),
            "constants": len(constants),
            "adapter_constants": adapter_constants,
        }
        not_run = tuple(("adapter swap", f"adapter tensor {f} was folded by Inductor") for f in folded[:1])
        return Lowered(
            files=(PACKAGE_FILE,),
            inputs=tuple(_describe_inputs(signature)),
            outputs=tuple(_describe_outputs(program, signature)),
            info=info,
            not_run=not_run,
        )

    def load(self, directory: Path, target: Mapping[str, Any]) -> AotiRunner:
        return AotiRunner(Path(directory) / target.get("package", PACKAGE_FILE), target, Path(directory))


class AotiRunner:
    """A loaded AOTInductor package. ``run`` takes and returns numpy arrays; it may be called from
    several threads (calls of a swappable artifact are serialized, see the module docstring)."""

    def __init__(self, path: Path, target: Mapping[str, Any], directory: Path | None = None) -> None:
        self.device = target.get("device", "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"{path}: compiled for CUDA, and torch sees no CUDA device here")
        import peftc.ops  # noqa: F401  (a package may call peftc ops that were left undecomposed)

        self.model = torch._inductor.aoti_load_package(str(path))
        self._order: list[str] = list(target["input_order"])
        self.input_names = [n for n in self._order if n != banks.INDEX_INPUT]  # the runner fills the index
        self.output_names: list[str] = list(target["output_order"])
        self.adapter_constants: dict[str, Mapping[str, Any]] = dict(target.get("adapter_constants", {}))
        directory = directory or path.parent
        self.files = banks.AdapterFiles({n: directory / p for n, p in target.get("adapter_files", {}).items()})
        self._slots = _slot_names(target.get("slots"))
        self._active: tuple[str | None, ...] | None = None
        self._lock = threading.Lock()

    @property
    def adapters(self) -> list[str]:
        return self.files.names

    def register(self, name: str, path: str | Path) -> None:
        """Make the slot file at ``path`` available as adapter ``name``."""
        self.files.register(name, path)
        with self._lock:
            self._active = None

    def run(self, feeds: Mapping[str, np.ndarray], adapter: banks.Choice = None) -> dict[str, np.ndarray]:
        """Run on ``feeds``; with slots, with no adapter (None), one (a name) or one per batch row."""
        if self._slots is None:
            return self._run(feeds)
        size, names = self._slots
        feeds = dict(feeds)
        with self._lock:
            if size:
                batch = len(next(iter(feeds.values())))
                used, index = banks.rows(adapter, batch, size)
                feeds[banks.INDEX_INPUT] = index
                wanted: tuple[str | None, ...] = used
            else:
                wanted = (banks.single(adapter),)
            if wanted != self._active:
                self._fill(wanted, size, names)
                self._active = wanted
            return self._run(feeds)

    def _fill(self, wanted: tuple[str | None, ...], size: int, names: Mapping[str, str]) -> None:
        """Load the slot constants for ``wanted`` (bank rows, or the one adapter; None: zeros)."""
        if size:
            values = banks.stack(size, names, [self._values(n) for n in wanted if n is not None])
            values = {k: values.get(k, np.zeros_like(self._zeros(k))) for k in names}
        else:
            name = wanted[0]
            source = self._values(name) if name is not None else {}
            values = {k: source.get(slot, self._zeros(k)) for k, slot in names.items()}
        self.model.load_constants(
            {k: torch.from_numpy(v).to(self.device) for k, v in values.items()}, check_full_update=False
        )

    def _zeros(self, name: str) -> np.ndarray:
        want = self.adapter_constants[name]
        return np.zeros(want["shape"], dtype=np.dtype(want["dtype"]))

    def _values(self, name: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return self.files.read(name, "values", lambda path: load_file(str(path)))

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(feeds, [n for n in self._order if n in feeds or n != banks.INDEX_INPUT], self._order)
        flat = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self._order]
        with torch.no_grad():
            outputs = self.model.loader.boxed_run(flat)
        return {
            name: (value.float() if value.dtype == torch.bfloat16 else value).cpu().numpy()
            for name, value in zip(self.output_names, outputs, strict=True)
        }


def _slot_names(slots: Mapping[str, Any] | None) -> tuple[int, dict[str, str]] | None:
    """``(bank size, {slot constant → the name adapter files use})`` of a swappable artifact."""
    if not slots:
        return None
    from peftc.slots import SlotTable

    table = SlotTable.from_json(slots)
    single = dataclasses.replace(table, bank=0)
    names = {
        table.names.get(s.module, {}).get(p, table.fqn(s.module, p)): single.fqn(s.module, p)
        for s in table.slots
        for p in ("A", "B")
    }
    return table.bank, names


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
