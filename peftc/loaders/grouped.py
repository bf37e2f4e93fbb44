"""Grouped-query attention in the traced generation step without repeating the keys and values.

Hugging Face's ``sdpa`` attention gives a GQA model (LLaMA, Qwen2, Mistral: ``num_key_value_groups`` =
heads / kv_heads > 1) a mask and, under ``torch.export``, copies the keys and values to every query
head (``repeat_kv``: an expand and a reshape that materialises ``[batch, heads, total, head_dim]``)
before ``scaled_dot_product_attention``. In a decode step that is a ``total``-long copy of every layer's
cache, twice the size of the cache itself, on top of the concatenation that makes ``present.*``.

While the step is traced (:func:`traced_with_groups`), attention runs on the key/value heads instead:
the query ``[batch, heads, seq, d]`` is read as ``[batch, kv_heads, groups·seq, d]`` (head ``h = kv·groups
+ g`` becomes rows ``g·seq … g·seq + seq - 1`` of key/value head ``kv``) and the ``[batch, 1, seq, total]``
mask is tiled ``groups`` times along its rows, so every query row meets the mask row of its token. The
keys and values enter SDPA as the cache holds them. Eager calls (PEFT's oracle of the same step) keep
transformers' own attention, so the compile's verification compares the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

GROUPED = "peftc_grouped_sdpa"
"""The attention implementation name registered with transformers while a step is traced."""


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-interface signature: ``[batch, seq, heads, d]`` output of SDPA over the
    key/value heads (module docstring); anything but a GQA layer with a head-shared 4-D mask and no extra
    terms goes to transformers' ``sdpa_attention_forward`` unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    extra = any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sinks", "s_aux"))
    if groups == 1 or extra or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, seq, _ = query.shape
    kv_heads, dim = key.shape[1], query.shape[-1]
    rows = query.reshape(batch, kv_heads, groups, seq, dim).contiguous().view(batch, kv_heads, groups * seq, dim)
    mask = tiled(attention_mask, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    out = out.view(batch, kv_heads, groups, seq, value.shape[-1]).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, heads, value.shape[-1]), None


def tiled(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``[batch, 1, seq, total]`` → ``[batch, 1, groups·seq, total]``: row ``g·seq + i`` is row ``i``."""
    return mask.repeat(1, 1, groups, 1)


@contextlib.contextmanager
def traced_with_groups(module: torch.nn.Module) -> Iterator[None]:
    """While ``torch.export`` traces ``module`` and its config asks for ``sdpa``: attention through
    :func:`grouped_sdpa` (restored on exit). Eager calls are left alone."""
    config = getattr(module, "config", None)
    if not torch.compiler.is_exporting() or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    if GROUPED not in AttentionInterface._global_mapping:
        AttentionInterface.register(GROUPED, grouped_sdpa)
    config._attn_implementation = GROUPED
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
