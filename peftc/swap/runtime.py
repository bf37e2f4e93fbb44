"""Running a swappable artifact: each call's slot values, chosen from its ``adapter=``.

:class:`SwappableRunner` wraps the target's :class:`~peftc.backends.base.SlotRunner`, which runs the
model with given slot values and reads adapter files in its own format. The wrapper decides what
each call reads: all zeros for the base model, one adapter file's values (read once, decoded from
fp16/int8 storage, then kept), or, with a bank, the adapters the call uses stacked into bank rows
plus an ``adapter_index`` per batch row (banks are assembled once per set of adapters and kept, the
last few). The slot values it hands over are kept objects, so a target that loads them into its
model (AOTInductor) can tell when they are already loaded. Calls share no state beyond these caches:
concurrent calls with different adapters are safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peftc.backends.base import SlotRunner, check_feeds
from peftc.loaders.inputs import InputSignature
from peftc.swap import banks, storage
from peftc.swap.table import INDEX_INPUT, SlotTable

_BANK_CACHE = 8


class SwappableRunner:
    """A swappable artifact's runner: ``run(feeds, adapter=…)`` (see the module docstring).

    Args:
        inner: the target's runner of the artifact's model.
        target: the manifest's ``target`` record (``slots``, ``signature``).
        files: adapter name → (its adapter file, the file's sha256 from the manifest).
    """

    def __init__(
        self, inner: SlotRunner, target: Mapping[str, Any], files: Mapping[str, tuple[str | Path, str]]
    ) -> None:
        table = SlotTable.from_json(target["slots"])
        signature = InputSignature.from_json(target["signature"])
        self.inner = inner
        self.input_names = [n for n in inner.input_names if n != INDEX_INPUT]
        self.output_names = list(inner.output_names)
        self.files = banks.AdapterFiles(files)
        dtypes = table.dtypes()
        self._zeros = {name: np.zeros(shape, dtype=np.dtype(dtypes[name])) for name, shape in table.tensors().items()}
        self._size = table.bank
        self._names = table.bank_inputs()
        batched = [i.name for i in signature.inputs if i.shape[:1] == ("batch",) and i.name != INDEX_INPUT]
        self._batch_input = batched[0] if batched else None
        self._banks: OrderedDict[tuple[str, ...], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._stored = table.slot_dtype != "fp32"
        self._dtype = table.dtype

    def _values(self, path: Path) -> dict[str, np.ndarray]:
        """An adapter file's slot values, decoded from its storage dtype (``storage.py``)."""
        return storage.decode(self.inner.slot_values(path), self._dtype)

    def _decoded(self, path: Path) -> Any:
        """An fp16/int8 adapter file decoded, in the form the target's runner takes as slots."""
        return self.inner.load_values(self._values(path))

    @property
    def adapters(self) -> list[str]:
        return self.files.names

    def register(self, name: str, path: str | Path) -> None:
        """Make the adapter file at ``path`` adapter ``name`` (replacing what was read for that name),
        pinned to the file's sha256 now."""
        self.files.register(name, path)
        with self._lock:
            self._banks.clear()

    def run(self, feeds: Mapping[str, np.ndarray], adapter: banks.Choice = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` with no adapter (None), one adapter (a name), or one per batch row (a list)."""
        check_feeds(feeds, self.input_names)
        if not self._size:
            name = banks.single(adapter)
            reader = self._decoded if self._stored else self.inner.load_slots  # decoded once, when first read
            slots = self._zeros if name is None else self.files.read(name, "slots", reader)
            return self.inner.run(feeds, slots)
        batch = len(feeds[self._batch_input]) if self._batch_input else len(next(iter(feeds.values())))
        used, index = banks.rows(adapter, batch, self._size)
        return self.inner.run({**feeds, INDEX_INPUT: index}, self._bank(used))

    def _bank(self, used: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The banks holding ``used`` in rows 1, 2, … (kept for the last few sets of adapters)."""
        with self._lock:
            stacked = self._banks.get(used)
            if stacked is None:
                values = [self.files.read(name, "values", self._values) for name in used]
                stacked = self._banks[used] = banks.stack(self._zeros, self._names, values)
                while len(self._banks) > _BANK_CACHE:
                    self._banks.popitem(last=False)
            self._banks.move_to_end(used)
        return stacked
