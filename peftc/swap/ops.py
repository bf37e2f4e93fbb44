"""Adapter slots: LoRA sites whose factors are fixed-shape inputs, so adapters swap without recompiling.

A swappable artifact keeps every LoRA site unmerged with tensors of a fixed shape, the *slot*::

    y = base(x) + (x · Aᵀ) · Bᵀ          A: [R, d_in] (rows r..R-1 zero),  B: [d_out, R] = s·B_adapter, zero-padded

``R`` is the artifact's maximum rank; an adapter of rank ``r ≤ R`` fills the first ``r`` rows of
``A`` and columns of ``B``, and its scale ``s`` (α/r, α/√r, per-module patterns) is multiplied into
``B`` when its slot file is written, so neither rank nor scale needs a recompile. The zero slot is
the base model. Zero padding is exact: the extra terms are exact zeros.

Mixed-adapter batches (``*_bank`` ops) stack ``N`` slots into a bank and pick one per batch row with
an ``adapter_index`` input: ``A_row = A_bank[index[row]]``; row 0 of the bank is reserved for the base
model (all zeros).

Ops, each an ``torch.library.custom_op`` (one node in the IR, one ONNX translation):

* ``lora_slot(x, W, b, A, B, fan_in_fan_out)``: a linear or GPT-2 ``Conv1D`` module call;
* ``lora_embedding_slot(ids, E, Aᵀ, B)``: an embedding lookup, ``E[ids] + Aᵀ[ids] · Bᵀ``. The slot
  keeps ``A`` transposed (``[num, R]``), so a lookup reads rows and never transposes the table;
* ``lora_slot_bank`` / ``lora_embedding_slot_bank``: the same with banks and a per-row index.

S²FT slots hold ``K`` indices and a dense block (``peftc/methods/s2ft.py``), zero-padded: a padded
entry is index 0 with an all-zero block row/column, so it adds exact zeros::

    rows     y' = y + scatter_I(x Sᵀ)      I: [K], S: [K, d_in]
    columns  y' = y + x[..., I] Sᵀ         I: [K], S: [d_out, K]

* ``s2ft_slot(x, W, b, I, S, dim)``: the unmerged S²FT op (``s2ft_linear``) with the slot's indices;
* ``s2ft_slot_bank``: per batch row, the indices and block of bank row ``adapter_index[row]``
  (a gather / scatter-add along the last dim and one batched GEMM).

Sparse slots hold ``K`` row-major positions ``p`` into the weight and values ``v`` (PEFTC_SPARSE,
SHiRA), padded with position 0 and value 0. With ``r = p // d_in``, ``c = p % d_in``::

    y'[..., r_k] = y[..., r_k] + Σ x[..., c_k] · v_k

* ``sparse_slot(x, W, b, I, V)`` and ``sparse_slot_bank`` (per batch row, from banks).

The S²FT and sparse slot ops are composite (ATen bodies): every target lowers them without code of its own, and
no dense ``ΔW`` is ever formed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from peftc.methods import s2ft
from peftc.methods.record import Method
from peftc.ops import SiteOp, call_op, composite_op
from peftc.swap.table import INDEX_INPUT


def _base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool) -> torch.Tensor:
    return F.linear(x, weight.T if fan_in_fan_out else weight, bias)


def lora_slot(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slot_a: torch.Tensor,
    slot_b: torch.Tensor,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """A linear (or ``Conv1D``) module call plus the LoRA update held in its slot."""
    y = _base(x, weight, bias, fan_in_fan_out)
    return (y + F.linear(F.linear(x.to(slot_a.dtype), slot_a), slot_b)).to(y.dtype)


def _slot_fake(x, weight, bias, slot_a, slot_b, fan_in_fan_out):
    return _base(x, weight, bias, fan_in_fan_out)


def lora_embedding_slot(
    ids: torch.Tensor, weight: torch.Tensor, slot_a: torch.Tensor, slot_b: torch.Tensor
) -> torch.Tensor:
    """An embedding lookup plus the LoRA update held in its slot (PEFT's unmerged embedding form);
    ``slot_a`` is ``Aᵀ``."""
    y = F.embedding(ids, weight)
    return (y + F.linear(F.embedding(ids, slot_a), slot_b)).to(y.dtype)


def _embedding_fake(ids, weight, slot_a, slot_b):
    return F.embedding(ids, weight)


def _per_row(h: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``h[row] · bank[index[row]]ᵀ`` for every batch row; ``h`` is ``[batch, ..., k]``."""
    chosen = bank[index]  # [batch, out, k]
    flat = h.reshape(h.shape[0], -1, h.shape[-1])
    return torch.bmm(flat, chosen.transpose(1, 2)).reshape(*h.shape[:-1], chosen.shape[1])


def lora_slot_bank(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    fan_in_fan_out: bool,
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """``lora_slot`` with each batch row using the slot ``adapter_index[row]`` of the banks."""
    y = _base(x, weight, bias, fan_in_fan_out)
    h = _per_row(x.to(bank_a.dtype), bank_a, adapter_index)
    return (y + _per_row(h, bank_b, adapter_index)).to(y.dtype)


def _slot_bank_fake(x, weight, bias, bank_a, bank_b, fan_in_fan_out, adapter_index):
    return _base(x, weight, bias, fan_in_fan_out)


def lora_embedding_slot_bank(
    ids: torch.Tensor, weight: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor, adapter_index: torch.Tensor
) -> torch.Tensor:
    """``lora_embedding_slot`` with each batch row using the slot ``adapter_index[row]`` (banks of ``Aᵀ``)."""
    y = F.embedding(ids, weight)
    num = bank_a.shape[1]
    # Row b reads Aᵀ of its adapter: entry index[b]·num + id of the flattened [N·num, R] bank.
    flat = ids + (adapter_index * num).reshape(-1, *([1] * (ids.dim() - 1)))
    h = F.embedding(flat, bank_a.reshape(-1, bank_a.shape[-1]))  # [batch, seq..., R]
    return (y + _per_row(h, bank_b, adapter_index)).to(y.dtype)


def _embedding_bank_fake(ids, weight, bank_a, bank_b, adapter_index):
    return F.embedding(ids, weight)


def _slot_op(name: str, body: Any, fake: Any, base_params: tuple[str, ...], *, bank: bool) -> SiteOp:
    """A slot op: ``A``/``B`` slots (or banks, with the per-row index input) on a linear or embedding call."""
    return call_op(
        name,
        body,
        fake,
        base_params=base_params,
        tensor_roles=("bank_A", "bank_B") if bank else ("slot_A", "slot_B"),
        scalars=("fan_in_fan_out",) if "bias" in base_params else (),
        user_inputs=(INDEX_INPUT,) if bank else (),
        onnx=f"peftc.swap.onnx:{name}",
    )


LORA_SLOT = _slot_op("lora_slot", lora_slot, _slot_fake, ("weight", "bias"), bank=False)
LORA_EMBEDDING_SLOT = _slot_op("lora_embedding_slot", lora_embedding_slot, _embedding_fake, ("weight",), bank=False)
LORA_SLOT_BANK = _slot_op("lora_slot_bank", lora_slot_bank, _slot_bank_fake, ("weight", "bias"), bank=True)
LORA_EMBEDDING_SLOT_BANK = _slot_op(
    "lora_embedding_slot_bank", lora_embedding_slot_bank, _embedding_bank_fake, ("weight",), bank=True
)


@composite_op("s2ft_slot(Tensor x, Tensor weight, Tensor? bias, Tensor slot_i, Tensor slot_s, int dim) -> Tensor")
def s2ft_slot(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slot_i: torch.Tensor,
    slot_s: torch.Tensor,
    dim: int,
) -> torch.Tensor:
    """The base linear plus the S²FT update held in the slot (``s2ft_linear`` on the slot's tensors)."""
    return s2ft.s2ft_linear(x, weight, bias, slot_i, slot_s, dim)


@composite_op(
    "s2ft_slot_bank(Tensor x, Tensor weight, Tensor? bias, Tensor bank_i, Tensor bank_s, int dim, "
    "Tensor adapter_index) -> Tensor"
)
def s2ft_slot_bank(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bank_i: torch.Tensor,
    bank_s: torch.Tensor,
    dim: int,
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """``s2ft_slot`` with each batch row using the indices and block ``adapter_index[row]`` of the banks."""
    y = F.linear(x, weight, bias)
    block = bank_s[adapter_index].to(torch.float32)  # [batch, K, d_in] (rows) or [batch, d_out, K] (columns)
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(torch.float32)  # [batch, n, d_in]
    out = y.reshape(y.shape[0], -1, y.shape[-1]).to(torch.float32)  # [batch, n, d_out]
    positions = bank_i[adapter_index][:, None, :].expand(-1, flat.shape[1], -1)  # [batch, n, K]
    if dim == s2ft.COLUMNS:
        out = out + torch.bmm(flat.gather(-1, positions), block.transpose(1, 2))
    else:
        out = out.scatter_add(-1, positions, torch.bmm(flat, block.transpose(1, 2)))
    return out.reshape(y.shape).to(y.dtype)


@composite_op("sparse_slot(Tensor x, Tensor weight, Tensor? bias, Tensor slot_i, Tensor slot_v) -> Tensor")
def sparse_slot(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot_i: torch.Tensor, slot_v: torch.Tensor
) -> torch.Tensor:
    """The base linear plus the sparse update held in the slot: ``x[..., c] · v`` added into ``y[..., r]``."""
    y = F.linear(x, weight, bias)
    d_in = weight.shape[1]
    h = x.index_select(-1, slot_i % d_in).to(torch.float32) * slot_v.to(torch.float32)
    return y.to(torch.float32).index_add(-1, torch.div(slot_i, d_in, rounding_mode="floor"), h).to(y.dtype)


@composite_op(
    "sparse_slot_bank(Tensor x, Tensor weight, Tensor? bias, Tensor bank_i, Tensor bank_v, Tensor adapter_index) "
    "-> Tensor"
)
def sparse_slot_bank(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bank_i: torch.Tensor,
    bank_v: torch.Tensor,
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """``sparse_slot`` with each batch row using the positions and values ``adapter_index[row]`` of the banks."""
    y = F.linear(x, weight, bias)
    d_in = weight.shape[1]
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(torch.float32)  # [batch, n, d_in]
    out = y.reshape(y.shape[0], -1, y.shape[-1]).to(torch.float32)
    positions = bank_i[adapter_index][:, None, :].expand(-1, flat.shape[1], -1)  # [batch, n, K]
    h = flat.gather(-1, positions % d_in) * bank_v[adapter_index][:, None, :].to(torch.float32)
    out = out.scatter_add(-1, torch.div(positions, d_in, rounding_mode="floor"), h)
    return out.reshape(y.shape).to(y.dtype)


def _index_op(
    name: str, body: Any, *, bank: bool, values: str, scalars: tuple[str, ...], onnx: str | None = None
) -> SiteOp:
    """An S²FT (``values`` ``S``) or sparse (``V``) slot op on a linear call."""
    return SiteOp(
        name=name,
        form="call",
        tensor_roles=("bank_I", f"bank_{values}") if bank else ("slot_I", f"slot_{values}"),
        scalars=scalars,
        base_params=("weight", "bias"),
        user_inputs=(INDEX_INPUT,) if bank else (),
        body=body,
        onnx=onnx,
    )


S2FT_SLOT = _index_op(
    "s2ft_slot", s2ft_slot, bank=False, values="S", scalars=("dim",), onnx="peftc.methods.s2ft_onnx:s2ft_slot"
)
S2FT_SLOT_BANK = _index_op("s2ft_slot_bank", s2ft_slot_bank, bank=True, values="S", scalars=("dim",))
SPARSE_SLOT = _index_op("sparse_slot", sparse_slot, bank=False, values="V", scalars=())
SPARSE_SLOT_BANK = _index_op("sparse_slot_bank", sparse_slot_bank, bank=True, values="V", scalars=())

SLOTS = Method(
    "slots",
    (),
    None,
    ops=(
        LORA_SLOT,
        LORA_EMBEDDING_SLOT,
        LORA_SLOT_BANK,
        LORA_EMBEDDING_SLOT_BANK,
        S2FT_SLOT,
        S2FT_SLOT_BANK,
        SPARSE_SLOT,
        SPARSE_SLOT_BANK,
    ),
)
"""Not an adapter format: the ops of swappable artifacts' slots (``peftc/methods/registry.py`` lists it)."""
