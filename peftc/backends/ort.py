"""Running ONNX artifacts with onnxruntime (CPU, always available).

A swappable artifact's slots are overridable initializers (zero by default: the base model). Its
runner is a :class:`~peftc.backends.base.SlotRunner`: ``run(feeds, slots)`` takes either an adapter
file loaded through onnxruntime's multi-LoRA API (``LoraAdapter``, activated for that call only with
``RunOptions.add_active_adapter``: nothing is copied into the session and no state outlives the
call), a decoded fp16/int8 file's values as onnxruntime values (:class:`OrtSlots`), or a mapping of slot
tensors to arrays, fed as inputs (adapter banks). Concurrent calls with
different slots are safe.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peftc import memory
from peftc.backends.base import check_feeds
from peftc.errors import InputError, UnsupportedError, first_line

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}  # fmt: skip


# Threads of a session opened without ``threads``: 0 is onnxruntime's default (one per physical core).
# A process that runs beside others on the same cores (a test worker) sets it to 1.
DEFAULT_THREADS = 0


def write_adapter_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write arrays as an onnxruntime adapter file (``onnxruntime.AdapterFormat``)."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    adapter.export_adapter(str(path))


class OrtSlots(dict):
    """Slot tensor name → ``onnxruntime.OrtValue`` (each keeps its numpy array alive): decoded slot values,
    fed with the inputs through ``run_with_ort_values`` with no copy per call."""


class OrtRunner:
    """An onnxruntime session over one ``.onnx`` file. ``run`` is safe to call from several threads."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = DEFAULT_THREADS if threads is None else threads
        options.log_severity_level = 3
        # onnxruntime's SkipLayerNormalization CPU kernel is slower than the Add and LayerNormalization
        # it fuses (peftc/backends/onnx: _split_skip_norms); keep them apart.
        self.session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"]
        )
        memory.trim()  # the buffers the model file was read through
        self._types = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.input_names = list(self._types)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], slots: Any = None) -> dict[str, np.ndarray]:
        """Run on ``feeds``; ``slots``: a :meth:`load_slots` adapter, or slot tensors → arrays.

        onnxruntime logs nothing (its errors go to stderr otherwise) and its errors are re-raised as
        peftc's, on one line.

        Raises:
            InputError: onnxruntime refused the inputs (``INVALID_ARGUMENT``).
            UnsupportedError: onnxruntime failed otherwise.
        """
        import onnxruntime as ort

        prepared = self._prepare(feeds)
        options = ort.RunOptions()
        options.log_severity_level = 4  # fatal only: failures are raised, not printed
        as_values = isinstance(slots, OrtSlots)
        if as_values:
            prepared = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in prepared.items()}
        if isinstance(slots, Mapping):
            prepared.update(slots)
        elif slots is not None:
            options.add_active_adapter(slots)
        try:
            if as_values:
                values = self.session.run_with_ort_values(self.output_names, prepared, options)
                outputs = [v.numpy() for v in values]
            else:
                outputs = self.session.run(None, prepared, options)
        except Exception as e:
            message = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", first_line(e))
            if type(e).__name__ == "InvalidArgument":
                raise InputError(f"onnxruntime refused the inputs: {message}") from e
            raise UnsupportedError(f"onnxruntime failed to run the model: {message}") from e
        return dict(zip(self.output_names, outputs, strict=True))

    def load_slots(self, path: Path) -> Any:
        """An onnxruntime adapter file as a ``LoraAdapter`` (read into onnxruntime's buffers once)."""
        import onnxruntime as ort

        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter

    def load_values(self, values: Mapping[str, np.ndarray]) -> OrtSlots:
        """Slot values (a decoded fp16/int8 file) as onnxruntime values made once, bound per call beside the
        inputs as an activated ``LoraAdapter``'s are; no adapter file is written (``LoraAdapter`` loads
        only from a file: writing one took most of an fp16/int8 switch, benchmarks/hotswap_slot_dtype.py)."""
        import onnxruntime as ort

        return OrtSlots({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in values.items()})

    def slot_values(self, path: Path) -> dict[str, np.ndarray]:
        """An onnxruntime adapter file's arrays."""
        import onnxruntime as ort

        adapter = ort.AdapterFormat.read_adapter(str(path))
        # .numpy() views memory the AdapterFormat owns: copy before it is released.
        return {k: v.numpy().copy() for k, v in adapter.get_parameters().items()}

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(feeds, self.input_names)
        prepared = {}
        for name, value in feeds.items():
            array = np.asarray(value)
            want = self._types[name]
            prepared[name] = array.astype(want, copy=False) if want is not None else array
        return prepared
