"""The slot table of a swappable artifact: the contract between its compiled model and its adapter files.

Which modules have slots, their kind and shapes, the rank (LoRA) or capacities (S²FT, sparse ΔW) and
dtype, how adapter files store them (``--slot-dtype``), the bank size for mixed-adapter batches, and the
names of the slot tensors in the compiled model. It is stored in the manifest (``target.slots``) and read back by the runtime and by ``peftc
add-adapter``; it is plain data (no torch), so running an artifact does not need the compiler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from peftc.swap import storage

INDEX_INPUT = "adapter_index"
"""The input of a bank artifact that says which bank row each batch row reads."""
SLOT_ADAPTER = "slots"
"""The name slot tensors carry in the program: ``<module>.slot_A.slots``."""
LORA_KINDS = ("linear", "embedding")
S2FT_KINDS = ("s2ft_rows", "s2ft_columns")
SPARSE_KIND = "sparse"
INDEX_PART = "I"
"""The part of an S²FT or sparse slot that holds indices (int64); every other part has the table's dtype."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """One adapted module's slot."""

    module: str
    kind: str
    """LoRA: ``linear`` (nn.Linear / Conv1D call) or ``embedding``; S²FT: ``s2ft_rows`` (output rows
    updated) or ``s2ft_columns`` (input columns updated); ``sparse``: entries of an nn.Linear weight."""
    d_in: int
    """Input features; for an embedding, the vocabulary size."""
    d_out: int
    fan_in_fan_out: bool = False
    capacity: int = 0
    """S²FT slots: how many rows/columns an adapter may update here (``K``); sparse slots: how many
    entries; 0 for LoRA slots."""

    def parts(self) -> tuple[str, str]:
        """The slot's tensors: ``A``/``B`` (LoRA), ``I``/``S`` (S²FT indices and block) or ``I``/``V``
        (sparse: row-major positions and values)."""
        if self.kind == SPARSE_KIND:
            return (INDEX_PART, "V")
        return ("A", "B") if self.kind in LORA_KINDS else (INDEX_PART, "S")

    def shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Slot tensor → shape: ``A`` ``[R, d_in]`` (an embedding's ``Aᵀ``: ``[num, R]``), ``B`` ``[d_out, R]``;
        S²FT: ``I`` ``[K]``, ``S`` ``[K, d_in]`` (rows) or ``[d_out, K]`` (columns); sparse: ``I``, ``V`` ``[K]``."""
        k = self.capacity
        if self.kind == SPARSE_KIND:
            return {INDEX_PART: (k,), "V": (k,)}
        if self.kind == "s2ft_rows":
            return {INDEX_PART: (k,), "S": (k, self.d_in)}
        if self.kind == "s2ft_columns":
            return {INDEX_PART: (k,), "S": (self.d_out, k)}
        a = (self.d_in, rank) if self.kind == "embedding" else (rank, self.d_in)
        return {"A": a, "B": (self.d_out, rank)}


@dataclasses.dataclass(frozen=True)
class SlotTable:
    """Every slot of a swappable artifact, its rank, dtype and bank size."""

    rank: int
    dtype: str
    slots: tuple[Slot, ...]
    bank: int = 0
    """Mixed-adapter batches: slots per bank including the reserved base row 0 (0 = no bank)."""
    names: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    """module → {"A", "B"} → tensor name in the compiled model (filled in by lowering)."""
    slot_dtype: str = "fp32"
    """How adapter files store float slot tensors (``--slot-dtype``, ``storage.py``)."""
    depth: int = 0
    """The most slot ops on one path from an input to an output (what the storage budget scales with)."""

    def by_module(self) -> dict[str, Slot]:
        return {s.module: s for s in self.slots}

    def fqn(self, module: str, part: str) -> str:
        """The program's name for slot tensor ``part`` (``A``/``B``) of ``module``."""
        role = ("bank_" if self.bank else "slot_") + part
        return f"{module}.{role}.{SLOT_ADAPTER}"

    def bank_inputs(self) -> dict[str, str]:
        """Bank tensor name in the compiled model → the slot name adapter files use for it."""
        single = dataclasses.replace(self, bank=0)
        return {
            self.names.get(s.module, {}).get(part, self.fqn(s.module, part)): single.fqn(s.module, part)
            for s in self.slots
            for part in s.parts()
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "dtype": self.dtype,
            "bank": self.bank,
            "slot_dtype": self.slot_dtype,
            "slot_depth": self.depth,
            "slot_budget": storage.budget(self.slot_dtype, self.depth),
            "slots": [
                {
                    **dataclasses.asdict(s),
                    "tensors": {
                        part: {
                            "name": self.names.get(s.module, {}).get(part, self.fqn(s.module, part)),
                            "shape": list(shape),
                        }
                        for part, shape in self.shapes_of(s).items()
                    },
                    "keys": _key_patterns(s),
                }
                for s in self.slots
            ],
        }

    def shapes_of(self, slot: Slot) -> dict[str, tuple[int, ...]]:
        shapes = slot.shapes(self.rank)
        return {k: ((self.bank, *v) if self.bank else v) for k, v in shapes.items()}

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Slot tensor name in the compiled model → its shape (with the bank axis, if any)."""
        return {
            self.names.get(s.module, {}).get(part, self.fqn(s.module, part)): shape
            for s in self.slots
            for part, shape in self.shapes_of(s).items()
        }

    def dtypes(self) -> dict[str, str]:
        """Slot tensor name in the compiled model → its dtype (indices are int64)."""
        return {
            self.names.get(s.module, {}).get(part, self.fqn(s.module, part)): "int64"
            if part == INDEX_PART
            else self.dtype
            for s in self.slots
            for part in s.parts()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlotTable:
        slots = tuple(
            Slot(s["module"], s["kind"], s["d_in"], s["d_out"], s["fan_in_fan_out"], int(s.get("capacity", 0)))
            for s in data["slots"]
        )
        names = {s["module"]: {part: t["name"] for part, t in s["tensors"].items()} for s in data["slots"]}
        bank, depth = int(data.get("bank", 0)), int(data.get("slot_depth", 0))
        return cls(int(data["rank"]), str(data["dtype"]), slots, bank, names, data.get("slot_dtype", "fp32"), depth)


def _key_patterns(slot: Slot) -> dict[str, str]:
    if slot.kind in S2FT_KINDS:  # PEFTC_S2FT keys carry no prefix
        return {INDEX_PART: f"{slot.module}.{slot.kind}", "S": f"{slot.module}.s2ft_block"}
    if slot.kind == SPARSE_KIND:  # PEFTC_SPARSE's (SHiRA: <prefix>.shira_indices / .shira_weight)
        return {INDEX_PART: f"{slot.module}.weight.sparse_indices", "V": f"{slot.module}.weight.sparse_values"}
    prefix = f"base_model.model.{slot.module}"
    if slot.kind == "embedding":
        return {"A": f"{prefix}.lora_embedding_A", "B": f"{prefix}.lora_embedding_B"}
    return {"A": f"{prefix}.lora_A.weight", "B": f"{prefix}.lora_B.weight"}
