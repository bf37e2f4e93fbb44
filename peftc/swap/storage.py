"""How an adapter file stores its slot values: ``--slot-dtype fp32|fp16|int8`` (numpy only, no torch).

The compiled model's slots keep the slot table's dtype (fp32 for an fp32 adapter); only the files
change. ``fp16`` stores every float slot tensor in fp16. ``int8`` stores each as int8 with one fp32
scale per row (the first axis: a LoRA ``A`` row is one rank component, a ``B`` row one output
channel, an embedding's ``Aᵀ`` row one token; a 1-D tensor has one scale): ``q = round(x / s)``,
``s = max|row| / 127``, the scales under ``<name>.scale``. Index tensors (int64) are stored as they
are. The runner decodes a file once, when it first reads it (:func:`decode`), so a call runs the
very graph an fp32 file would feed.

The error this adds is verified per adapter like any other, against a budget from the format
(:func:`budget`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SLOT_DTYPES = ("fp32", "fp16", "int8")
"""``--slot-dtype``'s choices."""
SCALE_SUFFIX = ".scale"
"""The key of an int8 tensor's per-row scales: its own key with this appended."""
_LEVELS = 127
_UNIT = {"fp32": 0.0, "fp16": 2.0**-11, "int8": 1 / (2 * _LEVELS)}
"""Each format's unit roundoff: the largest rounding error of one stored value relative to its row's
largest magnitude (int8: half a step of ``max|row| / 127``; fp16: relative to the value itself, so at
most the same relative to the row's largest)."""
_OPERANDS = 2
"""Stored operands per slot op: a LoRA slot's ``A`` and ``B`` (S²FT and sparse slots store one: the
bound holds for them too)."""


def encode(values: Mapping[str, np.ndarray], slot_dtype: str) -> dict[str, np.ndarray]:
    """An adapter file's arrays, slot name → value, stored as ``slot_dtype``."""
    if slot_dtype == "fp32":
        return dict(values)
    stored = {}
    for name, value in values.items():
        if not np.issubdtype(value.dtype, np.floating):
            stored[name] = value
        elif slot_dtype == "fp16":
            stored[name] = value.astype(np.float16)
        else:
            stored[name], stored[name + SCALE_SUFFIX] = quantize(value)
    return stored


def quantize(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``value`` as int8 with one fp32 scale per row (``max|row| / 127``; 0 for an all-zero row)."""
    rows = value.astype(np.float32).reshape(value.shape[0] if value.ndim > 1 else 1, -1)
    scale = np.abs(rows).max(axis=1) / _LEVELS
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(rows / safe), -_LEVELS, _LEVELS).astype(np.int8)
    return q.reshape(value.shape), scale.astype(np.float32)


def decode(stored: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Slot values (float tensors in the slot table's ``dtype``) from an adapter file's arrays."""
    values = {}
    for name, value in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        if scale is not None:
            rows = value.reshape(len(scale), -1).astype(np.float32) * scale[:, None]
            value = rows.reshape(value.shape)
        values[name] = value.astype(np.dtype(dtype), copy=False) if np.issubdtype(value.dtype, np.floating) else value
    return values


def budget(slot_dtype: str, depth: int) -> float:
    """The error ``slot_dtype`` storage may add, relative to each output's largest magnitude.

    As ``peftc.precision.budget`` propagates rounding: every slot op on an output's longest path
    (``depth`` of them) multiplies by ``_OPERANDS`` stored tensors, each rounded by at most ``u`` of
    its row's largest magnitude (:data:`_UNIT`), independent errors that add like a random walk:
    ``u·√(2·depth)``. Nothing else is rounded (activations and the slot ops' arithmetic stay in the
    artifact's precision). 0 for fp32.
    """
    return _UNIT[slot_dtype] * (_OPERANDS * max(depth, 1)) ** 0.5
