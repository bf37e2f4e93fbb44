"""Running ONNX artifacts with onnxruntime (CPU, always available)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from peftc.errors import InputError

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}  # fmt: skip


class OrtRunner:
    """An onnxruntime session over one ``.onnx`` file. ``run`` is safe to call from several threads."""

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._types = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self._types]
        if missing or extra:
            raise InputError(
                f"inputs do not match the model: missing {missing}, unexpected {extra}; expected {self.input_names}"
            )
        prepared = {}
        for name, value in feeds.items():
            array = np.asarray(value)
            want = self._types[name]
            prepared[name] = array.astype(want, copy=False) if want is not None else array
        return dict(zip(self.output_names, self.session.run(None, prepared), strict=True))
