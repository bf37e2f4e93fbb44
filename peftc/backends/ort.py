"""Running ONNX artifacts with onnxruntime (CPU, always available).

Swappable artifacts keep their adapter slots as overridable initializers (zero: the base model).
A call with ``adapter=name`` activates that adapter's slot file through onnxruntime's multi-LoRA API
(``LoraAdapter`` + ``RunOptions.add_active_adapter``): nothing is copied into the session and no
state outlives the call, so concurrent calls with different adapters are safe. Slot files are
loaded on first use and kept (onnxruntime reads them into its own buffers once).

With an adapter bank (``--multi-adapter``), each call feeds the banks (the base in row 0, then the
adapters the call uses) and an ``adapter_index`` per batch row; banks are assembled once per set of
adapters and cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peftc.backends import banks
from peftc.backends.banks import INDEX_INPUT, Choice
from peftc.backends.base import check_feeds

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}  # fmt: skip
_BANK_CACHE = 8


class OrtRunner:
    """An onnxruntime session over one ``.onnx`` file. ``run`` is safe to call from several threads.

    Args:
        adapters: adapter name → slot file, for swappable artifacts.
        bank: with an adapter bank: ``(bank size, {bank input → slot name})``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int = 0,
        adapters: Mapping[str, str | Path] | None = None,
        bank: tuple[int, Mapping[str, str]] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self._types = {i.name: _ORT_TYPES.get(i.type) for i in inputs}
        index_dim = next((i.shape[0] for i in inputs if i.name == INDEX_INPUT), None)
        # The input whose first dim is the index's (the batch) tells a call its batch size.
        self._batch_input = next(
            (i.name for i in inputs if i.name != INDEX_INPUT and i.shape and i.shape[0] == index_dim), None
        )
        self.input_names = [n for n in self._types if n != INDEX_INPUT]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.files = banks.AdapterFiles(adapters)
        self._banks = bank
        self._bank_cache: OrderedDict[tuple[str, ...], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def adapters(self) -> list[str]:
        return self.files.names

    def register(self, name: str, path: str | Path) -> None:
        """Make the slot file at ``path`` available as adapter ``name``."""
        self.files.register(name, path)
        with self._lock:
            self._bank_cache.clear()

    def run(self, feeds: Mapping[str, np.ndarray], adapter: Choice = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` with no adapter (None), one adapter (a name), or one per batch row (a list)."""
        prepared = self._prepare(feeds)
        options = None
        if self._banks is not None:
            batch = int(prepared[self._batch_input].shape[0]) if self._batch_input else 1
            prepared.update(self._bank_feeds(adapter, batch))
        elif (name := banks.single(adapter)) is not None:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_active_adapter(self._lora(name))
        return dict(zip(self.output_names, self.session.run(None, prepared, options), strict=True))

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(feeds, self.input_names)
        prepared = {}
        for name, value in feeds.items():
            array = np.asarray(value)
            want = self._types[name]
            prepared[name] = array.astype(want, copy=False) if want is not None else array
        return prepared

    def _lora(self, name: str) -> Any:
        def load(path: Path) -> Any:
            import onnxruntime as ort

            adapter = ort.LoraAdapter()
            adapter.Load(str(path))
            return adapter

        return self.files.read(name, "lora", load)

    def _bank_feeds(self, adapter: Choice, batch: int) -> dict[str, np.ndarray]:
        size, inputs = self._banks
        used, index = banks.rows(adapter, batch, size)
        with self._lock:
            stacked = self._bank_cache.get(used)
            if stacked is None:
                stacked = banks.stack(size, inputs, [self._values(name) for name in used])
                self._bank_cache[used] = stacked
                while len(self._bank_cache) > _BANK_CACHE:
                    self._bank_cache.popitem(last=False)
            self._bank_cache.move_to_end(used)
        return {**stacked, INDEX_INPUT: index}

    def _values(self, name: str) -> dict[str, np.ndarray]:
        """An adapter file's slot values (slot name → array)."""

        def read(path: Path) -> dict[str, np.ndarray]:
            import onnxruntime as ort

            adapter = ort.AdapterFormat.read_adapter(str(path))
            # .numpy() views memory the AdapterFormat owns: copy before it is released.
            return {k: v.numpy().copy() for k, v in adapter.get_parameters().items()}

        return self.files.read(name, "values", read)
