"""Writing a combined adapter: a PEFT LoRA directory, or peftc's full-ΔW format (``peftc/methods/delta.py``).

* :class:`LoraOutput` (``cat``, ``svd``): per linear module ``B`` ``[d_out, R_m]`` and ``A`` ``[R_m, d_in]``
  with scale 1 (``lora_alpha = r``; modules of another rank get ``rank_pattern``/``alpha_pattern``
  entries), ``fan_in_fan_out`` for Conv1D bases, and bias deltas as ``lora_B.bias`` (``lora_bias``).
  PEFT and peftc both load it.
* :class:`DeltaOutput`: ``{state-dict key: ΔW}`` in fp32, streamed into the safetensors file tensor by
  tensor (the header is written first from the known shapes), so writing holds one tensor at a time.

Both write into a marked temporary directory beside ``out`` that is renamed into place when complete
(``peftc.artifact.temp``); ``combine.json`` beside the adapter records how it was made.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from peftc.artifact.output import OutputDir
from peftc.methods.delta import FORMAT_VERSION, PEFT_TYPE

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
RECORD = "combine.json"
_PREFIX = "base_model.model."


class Destination(OutputDir):
    """A temporary directory that becomes ``out`` (which must not exist, or be an empty directory;
    ``peftc.artifact.output``), never the model's or an adapter's own files."""

    def __init__(self, out: str | os.PathLike[str], inputs: Sequence[Path] = ()) -> None:
        super().__init__(out, command="combine", inputs=inputs)

    def commit(self, record: Mapping[str, Any]) -> Path:  # type: ignore[override]
        """Write ``combine.json`` and move the directory into place."""
        (self.tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return super().commit()


class DeltaOutput:
    """A full-ΔW adapter written tensor by tensor, in the order of ``shapes``."""

    def __init__(self, directory: Path, shapes: Mapping[str, Sequence[int]], base_model: str | None) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in shapes.items():
            size = 4 * int(torch.Size(shape).numel())
            header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        config = {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, "dtype": "float32"}
        config["base_model_name_or_path"] = base_model
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        self._file = (directory / WEIGHTS).open("wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._order = list(shapes)
        self._shapes = dict(shapes)

    def add(self, key: str, delta: torch.Tensor) -> None:
        """Append the next tensor (keys must come in the order given)."""
        expected = self._order.pop(0)
        if key != expected or tuple(delta.shape) != tuple(self._shapes[key]):
            raise AssertionError(f"delta {key} {list(delta.shape)} out of order (expected {expected})")
        self._file.write(delta.detach().to(torch.float32).contiguous().numpy().tobytes())

    def close(self) -> None:
        """Finish the file (every tensor must have been added)."""
        self._file.close()
        if self._order:
            raise AssertionError(f"{len(self._order)} deltas never written, first {self._order[0]}")


class LoraOutput:
    """A PEFT LoRA adapter gathered module by module (the factors are small)."""

    def __init__(self) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self.transposed = False

    def add_weight(self, module: str, b: torch.Tensor, a: torch.Tensor, layout: str) -> None:
        """``ΔW = B·A`` ([d_out, d_in]) of ``module``'s weight."""
        self.factors[module] = (b.contiguous(), a.contiguous())
        self.transposed |= layout == "linear_t"

    def add_bias(self, module: str, delta: torch.Tensor) -> None:
        """The delta of ``module``'s bias (the module's weight must get factors too)."""
        self.biases[module] = delta.contiguous()

    def write(self, directory: Path, base_model: str | None) -> dict[str, int]:
        """Write config and tensors; returns each module's rank."""
        from safetensors.torch import save_file

        ranks = {m: int(a.shape[0]) for m, (b, a) in self.factors.items()}
        r = max(ranks.values(), default=1)
        tensors = {}
        for module, (b, a) in self.factors.items():
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = b
            if self.biases:
                bias = self.biases.get(module, torch.zeros(b.shape[0]))
                tensors[f"{_PREFIX}{module}.lora_B.bias"] = bias
        config = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": r,
            "target_modules": sorted(self.factors),
            "rank_pattern": {m: k for m, k in ranks.items() if k != r},
            "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": self.transposed,
            "lora_bias": bool(self.biases),
            "bias": "none",
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "base_model_name_or_path": base_model,
        }
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(directory / WEIGHTS))
        return ranks
