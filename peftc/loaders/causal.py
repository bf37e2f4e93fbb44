"""Causal language models compiled for generation (``--task text-generation``): the KV cache as tensors.

The artifact runs one step of generation, prefill or decode alike::

    inputs   input_ids [batch, seq]  attention_mask [batch, total]  position_ids [batch, seq]
             past_key_values_{i}_key / _value [batch, kv_heads, past, head_dim]   (past = 0 at prefill)
    outputs  logits [batch, seq, vocab]
             present.{i}.key / .value [batch, kv_heads, total, head_dim]           (total = past + seq)

``attention_mask`` covers the past and the new tokens (0: padding), as in Hugging Face ``generate``.
The past length is dynamic (a named dim, ``past``), so the caches grow by concatenation, and a step
costs attention over ``total`` keys only: no static buffer of ``max_position_embeddings`` slots.

The model's own ``forward`` is replaced on the instance by :func:`_forward_with_past`, which builds a
``transformers.DynamicCache`` from the tensors and an additive 4-D mask (causal over ``past + q``,
padding from ``attention_mask``; masked entries hold the dtype's most negative value, so a row that is
all padding stays finite). While the step is traced, a GQA model's attention runs on its key/value
heads without copying them to every query head (``grouped.py``). Module paths are unchanged, so
adapters match as they do on the plain model and PEFT (``PeftModel`` calls the instance's ``forward``)
is the oracle of the same step.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch

from peftc.errors import UnsupportedError
from peftc.loaders.grouped import traced_with_groups
from peftc.loaders.inputs import DimSpec, InputSignature, TensorInput

TEXT_GENERATION = "text-generation"
TASKS = (TEXT_GENERATION,)
NO_TASK = "none"
"""``load_model(task=NO_TASK)``: the model's own forward, even for a causal LM (no generation step)."""
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def key_name(layer: int) -> str:
    """The artifact input holding layer ``layer``'s past keys."""
    return f"past_key_values_{layer}_key"


def value_name(layer: int) -> str:
    """The artifact input holding layer ``layer``'s past values."""
    return f"past_key_values_{layer}_value"


def inferred_task(module: Any) -> str | None:
    """``text-generation`` when ``module``'s ``config.architectures`` names a causal LM class,
    ``text2text-generation`` for a ``…ForConditionalGeneration`` class with ``config.is_encoder_decoder``,
    else None."""
    config = getattr(module, "config", None)
    architectures = [str(a) for a in getattr(config, "architectures", None) or []]
    if getattr(config, "is_encoder_decoder", False) and any(
        a.endswith("ForConditionalGeneration") for a in architectures
    ):
        return "text2text-generation"
    return TEXT_GENERATION if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures) else None


def attach(module: torch.nn.Module, task: str) -> InputSignature:
    """Make ``module`` run one generation step with explicit caches; return that step's signature.

    Raises:
        UnsupportedError: an unknown task, or a model that is not a Hugging Face causal LM with a cache.
    """
    if task not in TASKS:
        raise UnsupportedError(f"--task {task!r}: peftc compiles text-generation, text2text-generation")
    name = type(module).__name__
    can_generate = getattr(module, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or not name.endswith(_CAUSAL_SUFFIXES):
        raise UnsupportedError(
            f"--task {task}: {name} is not a causal language model (text generation needs a Hugging Face "
            "…ForCausalLM/…LMHeadModel class)"
        )
    layers = _cache_layout(module)
    config = module.config
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not longest:
        raise UnsupportedError(f"--task {task}: {name}'s config gives no max_position_embeddings")
    vocab = int(config.vocab_size)
    dims = {
        "batch": DimSpec("batch"),
        "seq": DimSpec("seq", 1, longest),
        "past": DimSpec("past", 0, longest - 1),
        "total": DimSpec("total", 1, 2 * longest - 1, sum_of=("past", "seq")),
    }
    inputs = [
        TensorInput("input_ids", ("batch", "seq"), "int64", "index", 0, vocab),
        TensorInput("attention_mask", ("batch", "total"), "int64", "mask"),
        TensorInput("position_ids", ("batch", "seq"), "int64", "index", 0, longest),
    ]
    for index, (heads, width) in enumerate(layers):
        shape = ("batch", heads, "past", width)
        inputs += [TensorInput(key_name(index), shape, "float32"), TensorInput(value_name(index), shape, "float32")]

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return _forward_with_past(self, len(layers), *args, **kwargs)

    forward.__signature__ = _signature(len(layers))  # type: ignore[attr-defined]
    module.forward = types.MethodType(forward, module)
    return InputSignature(tuple(inputs), dims)


def _cache_layout(module: torch.nn.Module) -> list[tuple[int, int]]:
    """``(kv_heads, head_dim)`` of each layer's cache, from one eager step of two tokens."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = module(input_ids=torch.zeros(1, 2, dtype=torch.long), cache=DynamicCache(), use_cache=True)
    cache = getattr(out, "cache", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise UnsupportedError(f"--task {TEXT_GENERATION}: {type(module).__name__} keeps no per-layer KV cache")
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]


def _signature(layers: int) -> inspect.Signature:
    """``forward(self, input_ids, attention_mask, position_ids, *, past_key_values_0_key, …)``: torch.export
    binds the example by these names."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    names = ["self", "input_ids", "attention_mask", "position_ids"]
    params = [inspect.Parameter(n, kind) for n in names]
    for index in range(layers):
        for name in (key_name(index), value_name(index)):
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


def step_mask(attention_mask: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive ``[batch, 1, seq, total]`` mask of a step: key ``k`` is visible to new token ``q`` when
    ``k <= past + q`` and ``attention_mask[:, k]`` is not 0."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = torch.arange(seq, device=attention_mask.device) + (total - seq)
    visible = (attention_mask[:, None, None, :] != 0) & (keys[None, None, None, :] <= queries[None, None, :, None])
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def _forward_with_past(
    self: torch.nn.Module,
    layers: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    **named: Any,
) -> dict[str, torch.Tensor]:
    """One generation step (the module docstring); extra keyword arguments PEFT passes must be None."""
    from transformers import DynamicCache

    pasts = [(named.pop(key_name(i)), named.pop(value_name(i))) for i in range(layers)]
    given = sorted(k for k, v in named.items() if v is not None)
    if given:
        raise TypeError(f"unexpected inputs {given}")
    cache = DynamicCache(pasts, config=self.config)
    mask = step_mask(attention_mask, input_ids.shape[1], pasts[0][0].dtype)
    with traced_with_groups(self):
        out = type(self).forward(
            self, input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        )
    result = {"logits": out.logits}
    for index, layer in enumerate(out.cache.layers):
        result[f"present.{index}.key"] = layer.keys
        result[f"present.{index}.value"] = layer.values
    return result
