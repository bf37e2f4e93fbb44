"""Prefix tuning (PEFT ``PREFIX_TUNING``, and ``CARTRIDGE``, which PEFT runs the same way): trained
key/value rows at the head of every attention layer.

PEFT (``PeftModel.get_prompt`` and ``PeftModelFor<task>.forward``, ``peft/peft_model.py``) runs it as::

    kv[l]          = prompt_embeddings.view(n, 2L, H, d)[:, 2l : 2l+2]      per batch row, as [2, batch, H, n, d]
    cache          = DynamicCache(kv)                                       the prefix is the cache's head
    attention_mask = cat(ones(batch, n), attention_mask)
    outputs        = base(input_ids=…, attention_mask=…, past_key_values=cache)

with ``L = num_layers``, ``H = num_attention_heads`` and ``d = token_dim / H`` from the config, and
``token_type_ids`` dropped (``FEATURE_EXTRACTION``, ``CAUSAL_LM``). The file holds the rows PEFT uses
(with ``prefix_projection`` the MLP ran when PEFT saved them). The model sees ``n`` cached positions
first, so the real tokens' positions shift by ``n``; per-position outputs hold only the real tokens
(the prefix is in the cache, not in the sequence), as PEFT returns them. The cache PEFT's output also
carries is not a tensor output: the artifact does not return it.

Supported where PEFT builds a plain ``DynamicCache`` and calls the model with it: ``FEATURE_EXTRACTION``
and ``CAUSAL_LM`` of models whose key/value width is ``token_dim`` (PEFT passes the cache to any), in one
pass. For ``--task text-generation`` a ``CAUSAL_LM`` prefix is not inserted: it becomes the head of the
generation step's cache (``peftc/generation/prefix.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from peftc.errors import UnsupportedError
from peftc.loaders.inputs import InputSignature
from peftc.methods import common
from peftc.methods.base import AdapterSource
from peftc.methods.prompt import parse, wrapper
from peftc.methods.record import Inserted, Method

TASKS = {"FEATURE_EXTRACTION": False, "CAUSAL_LM": False}
"""Task types peftc inserts prefix tuning for (PEFT drops ``token_type_ids`` for both)."""
OTHER_CACHES = ("bloom", "gpt_bigcode", "gemma2", "gemma3_text", "gemma4")
"""Model types PEFT gives another cache or post-processes the prefix for (refused)."""


class Prefixed(torch.nn.Module):
    """``base`` called with the prefix as the head of its key/value cache (see the module docstring)."""

    def __init__(self, base: torch.nn.Module, prefix: torch.Tensor, layers: int, heads: int) -> None:
        super().__init__()
        self.base_model = base
        self.prompt_embeddings = torch.nn.Parameter(prefix.detach().clone().float(), requires_grad=False)
        self.layers, self.heads = layers, heads

    def cache(self, batch: int, dtype: torch.dtype) -> Any:
        """PEFT's ``get_prompt``: the prefix as a ``DynamicCache`` of ``layers`` ``(key, value)`` pairs."""
        from transformers import DynamicCache

        count, width = self.prompt_embeddings.shape
        rows = self.prompt_embeddings.to(dtype).unsqueeze(0).expand(batch, count, width)
        rows = rows.reshape(batch, count, 2 * self.layers, self.heads, width // (2 * self.layers * self.heads))
        return DynamicCache(rows.permute(2, 0, 3, 1, 4).split(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        from transformers.cache_utils import Cache

        batch, count = input_ids.shape[0], self.prompt_embeddings.shape[0]
        dtype = next(p.dtype for p in self.base_model.parameters() if p.is_floating_point())
        extra = {}
        if attention_mask is not None:
            ones = torch.ones(batch, count, dtype=torch.float32, device=attention_mask.device)
            extra["attention_mask"] = torch.cat((ones, attention_mask), dim=1)
        out = self.base_model(input_ids=input_ids, past_key_values=self.cache(batch, dtype), **extra)
        return type(out)(**{k: v for k, v in out.items() if not isinstance(v, Cache)})


def read(source: AdapterSource) -> parse.Prompt:
    """:func:`parse.read` for a prefix: rows of ``2·num_layers·token_dim``."""
    layers, width = parse.cfg_int(source, "num_layers", None), parse.cfg_int(source, "token_dim", None)
    parse.cfg_int(source, "num_attention_heads", None)
    return parse.read(source, TASKS, 2 * layers * width)


def insert(source: AdapterSource, module: torch.nn.Module, base: InputSignature) -> Inserted:
    """The wrapper ``module`` is traced in, and its inputs.

    Raises:
        UnsupportedError: a model PEFT prefixes otherwise (another cache), or whose layer count or
            key/value width is not the config's.
    """
    spec = read(source)
    cfg, where = source.config, str(source.config_path)
    layers, heads, width = cfg["num_layers"], cfg["num_attention_heads"], cfg["token_dim"]
    model = getattr(module, "config", None)
    kind = getattr(model, "model_type", "")
    if kind in OTHER_CACHES:
        raise UnsupportedError(f"{where}: prefix tuning on {kind!r}: PEFT builds another cache for it (not supported)")
    found = _attention(model)
    if found != (layers, width):
        raise UnsupportedError(
            f"{where}: num_layers={layers}, token_dim={width} (key/value width per layer) do not fit the model's "
            f"{found[0]} layers of width {found[1]}"
        )
    signature = wrapper.signature(base, spec.count, token_types=False, tasks=None, where=where)

    def wrap(traced: torch.nn.Module) -> torch.nn.Module:
        return Prefixed(traced, spec.prompt.tensor, layers, heads)

    return Inserted(wrap, signature)


def _attention(config: Any) -> tuple[int | None, int | None]:
    """The model's layer count and key/value width per layer (heads × head size) from its config."""
    if config is None:
        return None, None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return layers, (kv_heads * head_dim if kv_heads and head_dim else None)


_SIZES = "checked against the model's layers and key/value width"
FIELDS = common.Fields(
    honoured=(
        "task_type",
        "num_virtual_tokens",
        "token_dim",
        "num_layers",
        "num_attention_heads",
        "num_transformer_submodules",
        "modules_to_save",
    ),
    ignored={
        "prefix_projection": "the projection ran when PEFT saved the adapter: the file holds its output",
        "encoder_hidden_size": "the projection's size (its output is in the file)",
        "init_weights": "initialisation only (the trained prefix is in the file)",
    },
)
CARTRIDGE_FIELDS = common.Fields(
    honoured=FIELDS.honoured,
    ignored={"num_frozen_tokens": "which rows were trained; the file holds every row of the prefix"},
)
METHOD = Method(
    "prefix_tuning", ("PREFIX_TUNING",), parse.parser("prefix_tuning", FIELDS, read), fields=FIELDS, insert=insert
)
CARTRIDGE = Method(
    "cartridge",
    ("CARTRIDGE",),
    parse.parser("cartridge", CARTRIDGE_FIELDS, read),
    fields=CARTRIDGE_FIELDS,
    insert=insert,
)
"""PEFT's ``CARTRIDGE``: a prefix trained as a key/value cache (some rows frozen), run as prefix tuning."""
