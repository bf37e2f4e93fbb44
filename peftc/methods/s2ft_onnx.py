"""ONNX translations of the unmerged S²FT ops (``peftc/methods/s2ft.py``), for ``torch.onnx.export``.

Each mirrors its op's eager body (the block's GEMM in fp32, added in fp32, cast back) with element ops
that onnxruntime runs without copying a full-size output:

* input columns (``o_proj``/``down_proj``): ``y + x[..., I] Sᵀ``. The selected columns are read with
  ``GatherElements`` over indices expanded to ``[..., k]`` (or a ``Slice`` for a range): onnxruntime's
  ``Gather`` on the last axis copies element by element and took ~30× as long as ``GatherElements`` on a
  ``[1024, 2048]`` input (2-vCPU AVX-512 VM). In fp32 with the block an initializer (``s2ft_linear``,
  ``s2ft_slice_linear``) they are stacked after ``x`` and ``Sᵀ`` under ``Wᵀ``: one GEMM
  ``[x, x_I] · [Wᵀ; Sᵀ]``, as LoRA's lowering does; onnxruntime folds the weight concatenation at load
  and the one copy per call is the input's. A separate GEMM with inner size ``k`` plus an ``Add`` of the
  whole output was the costliest part of a co-permuted model's adapter time (README, "ONNX lowering of the
  unmerged sites"). Slots (the block is an input: stacking would copy ``W`` on every call) and fp16/bf16
  (the block's product in fp32) keep that form;
* output rows (``v_proj``/``up_proj``): ``y[..., I] += x Sᵀ`` as one ``ScatterElements`` (``reduction``
  ``add``, indices expanded to ``[..., k]``) into the base product, which onnxruntime updates in place:
  the decomposition of ``index_add`` (``ScatterND`` between two full transposes) or of the slice-add-concat
  copies the whole output two or three times.

The indices and block are never added into the base weight, and the same lowering serves slots
(``s2ft_slot``), whose indices and block are inputs. ``tests/methods/test_s2ft_onnx.py`` checks the
translations against a dense reference and the graph's operators.
"""

from __future__ import annotations

from typing import Any

import onnx_ir
from onnxscript import opset18 as op

from peftc.backends.onnx.script import ints

ROWS = 0
FLOAT, INT64 = onnx_ir.DataType.FLOAT, onnx_ir.DataType.INT64


def _f32(value: Any, like: Any) -> Any:
    """``value`` (of ``like``'s dtype) in fp32; no node when it already is."""
    return value if like.dtype == FLOAT else op.Cast(value, to=int(FLOAT))


def _base(x: Any, weight: Any, bias: Any) -> Any:
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))  # the transpose is folded at load
    return y if bias is None else op.Add(y, bias)


def _int64(indices: Any) -> Any:
    return indices if getattr(indices, "dtype", None) in (None, INT64) else op.Cast(indices, to=int(INT64))


def _expanded(indices: Any, like: Any) -> Any:
    """``indices`` ``[k]`` broadcast to ``like``'s shape ``[..., k]`` (the Elements ops want full indices)."""
    return op.Expand(_int64(indices), op.Shape(like))


def _columns(x: Any, weight: Any, bias: Any, picked: Any, block: Any, *, stacked: bool = True) -> Any:
    """``y + x_I Sᵀ`` with ``x_I`` the picked input columns, in fp32, cast back to ``x``'s dtype.

    ``stacked`` (a block that is an initializer, all fp32): one GEMM ``[x, x_I] · [Wᵀ; Sᵀ]``, whose
    weight concatenation onnxruntime folds at load (LoRA's lowering, ``peftc/methods/lora/onnx.py``).
    """
    if stacked and x.dtype == weight.dtype == block.dtype == FLOAT:
        w_t, s_t = op.Transpose(weight, perm=[1, 0]), op.Transpose(block, perm=[1, 0])
        y = op.MatMul(op.Concat(x, picked, axis=-1), op.Concat(w_t, s_t, axis=0))
        return y if bias is None else op.Add(y, bias)
    y = _f32(_base(x, weight, bias), x)
    total = op.Add(y, op.MatMul(_f32(picked, x), op.Transpose(_f32(block, block), perm=[1, 0])))
    return total if x.dtype == FLOAT else op.Cast(total, to=int(x.dtype))


def _rows(x: Any, weight: Any, bias: Any, indices: Any, block: Any) -> Any:
    """``y[..., I] += x Sᵀ`` in fp32 (one in-place ``ScatterElements``), cast back to ``x``'s dtype."""
    y = _f32(_base(x, weight, bias), x)
    update = op.MatMul(_f32(x, x), op.Transpose(_f32(block, block), perm=[1, 0]))  # [..., k]
    total = op.ScatterElements(y, _expanded(indices, update), update, axis=-1, reduction="add")
    return total if x.dtype == FLOAT else op.Cast(total, to=int(x.dtype))


def s2ft_linear(x: Any, weight: Any, bias: Any, s2ft_indices: Any, s2ft_block: Any, dim: int) -> Any:
    """``peftc::s2ft_linear``: scattered into the output rows ``I`` (``dim`` 0) or on the gathered input
    columns ``I`` (one stacked GEMM in fp32, :func:`_columns`)."""
    return _indexed(x, weight, bias, s2ft_indices, s2ft_block, dim, stacked=True)


def _indexed(x: Any, weight: Any, bias: Any, indices: Any, block: Any, dim: int, *, stacked: bool) -> Any:
    if dim == ROWS:
        return _rows(x, weight, bias, indices, block)
    shape = op.Concat(op.Shape(x, end=-1), op.Shape(indices), axis=0)
    picked = op.GatherElements(x, op.Expand(_int64(indices), shape), axis=-1)
    return _columns(x, weight, bias, picked, block, stacked=stacked)


def s2ft_slice_linear(x: Any, weight: Any, bias: Any, s2ft_block: Any, start: int, dim: int) -> Any:
    """``peftc::s2ft_slice_linear``: the indices ``start … start + k - 1``."""
    k = s2ft_block.shape[dim]
    if dim == ROWS:
        return _rows(x, weight, bias, op.Constant(value_ints=list(range(start, start + k))), s2ft_block)
    picked = op.Slice(x, ints(start), ints(start + k), ints(-1))
    return _columns(x, weight, bias, picked, s2ft_block)


def s2ft_slot(x: Any, weight: Any, bias: Any, slot_i: Any, slot_s: Any, dim: int) -> Any:
    """``peftc::s2ft_slot``: :func:`s2ft_linear` on the slot's indices and block (both inputs, so never
    stacked under the base weight: that concatenation would copy the weight on every call)."""
    return _indexed(x, weight, bias, slot_i, slot_s, dim, stacked=False)
