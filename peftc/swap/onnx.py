"""ONNX translations of the adapter slot ops (``peftc/swap/ops.py``), for ``torch.onnx.export``.

Slots are overridable inputs, so nothing here may be folded at load time: ``A`` and ``B`` are
transposed per call (``R`` rows), never concatenated with the base weight (that would copy the weight
on every call). Each function mirrors its op's eager body; ``tests/test_swap.py`` checks them.
"""

from __future__ import annotations

from typing import Any

from onnxscript import opset18 as op

from peftc.backends.onnx.script import add_promoted, cast, ints


def _base_linear(x: Any, weight: Any, bias: Any, fan_in_fan_out: bool) -> Any:
    w_t = weight if fan_in_fan_out else op.Transpose(weight, perm=[1, 0])  # folded at load
    y = op.MatMul(x, w_t)
    return y if bias is None else op.Add(y, bias)


def lora_slot(x: Any, weight: Any, bias: Any, slot_a: Any, slot_b: Any, fan_in_fan_out: bool) -> Any:
    """``x Wᵀ + b + (x Aᵀ) Bᵀ``."""
    y = _base_linear(x, weight, bias, fan_in_fan_out)
    down = op.MatMul(cast(x, x, slot_a), op.Transpose(slot_a, perm=[1, 0]))
    up = op.MatMul(down, op.Transpose(slot_b, perm=[1, 0]))
    return add_promoted(y, x, up, slot_b)  # as the eager body: added in the promoted dtype, cast back


def lora_embedding_slot(ids: Any, weight: Any, slot_a: Any, slot_b: Any) -> Any:
    """``E[ids] + Aᵀ[ids] · Bᵀ`` (the slot holds ``Aᵀ``, so both lookups are row gathers)."""
    y = op.Gather(weight, ids, axis=0)
    up = op.MatMul(op.Gather(slot_a, ids, axis=0), op.Transpose(slot_b, perm=[1, 0]))
    return add_promoted(y, weight, up, slot_b)


def _per_row(h: Any, rank: int, bank: Any, index: Any) -> Any:
    """``h[b] · bank[index[b]]ᵀ`` for ``h`` ``[batch, ..., k]`` of ``rank`` dims: a batched MatMul over
    gathered slots."""
    chosen = op.Transpose(op.Gather(bank, index, axis=0), perm=[0, 2, 1])  # [batch, k, out]
    last = op.Slice(op.Shape(h), ints(rank - 1), ints(rank))
    out = op.MatMul(op.Reshape(h, op.Concat(ints(0, -1), last, axis=0)), chosen)  # [batch, n, out]
    leading = op.Slice(op.Shape(h), ints(0), ints(rank - 1))
    return op.Reshape(out, op.Concat(leading, op.Slice(op.Shape(out), ints(2), ints(3)), axis=0))


def lora_slot_bank(
    x: Any, weight: Any, bias: Any, bank_a: Any, bank_b: Any, fan_in_fan_out: bool, adapter_index: Any
) -> Any:
    """``lora_slot`` with row b reading slot ``adapter_index[b]`` of the banks."""
    y = _base_linear(x, weight, bias, fan_in_fan_out)
    rank = len(x.shape)
    h = _per_row(cast(x, x, bank_a), rank, bank_a, adapter_index)
    return add_promoted(y, x, _per_row(h, rank, bank_b, adapter_index), bank_b)


def lora_embedding_slot_bank(ids: Any, weight: Any, bank_a: Any, bank_b: Any, adapter_index: Any) -> Any:
    """``lora_embedding_slot`` per row: one gather from the ``[N·num, R]`` view of the ``Aᵀ`` bank."""
    y = op.Gather(weight, ids, axis=0)
    num = op.Slice(op.Shape(bank_a), ints(1), ints(2))
    offsets = op.Reshape(op.Mul(adapter_index, num), ints(-1, *([1] * (len(ids.shape) - 1))))
    table = op.Reshape(bank_a, op.Concat(ints(-1), op.Slice(op.Shape(bank_a), ints(2), ints(3)), axis=0))
    h = op.Gather(table, op.Add(ids, offsets), axis=0)  # [batch, seq..., R]
    up = _per_row(h, len(ids.shape) + 1, bank_b, adapter_index)
    return add_promoted(y, weight, up, bank_b)
