"""Encoder-decoder models compiled for generation (``--task text2text-generation``): two programs.

A ``text2text-generation`` artifact holds two lowered programs of the same model and adapters, each
compiled and verified on its own (``peftc/driver/pipeline.py``):

``encoder/`` (task ``text2text-generation-encoder``), run once per prompt::

    inputs   input_ids [batch, enc]  attention_mask [batch, enc]
    outputs  last_hidden_state [batch, enc, d_model]
             present.{i}.encoder.key / .value [batch, heads, enc, head_dim]   (the decoder's cross K/V)

the artifact itself (task ``text2text-generation``), one decoder step, prefill (``past`` = 0) or decode::

    inputs   input_ids [batch, seq]  encoder_attention_mask [batch, enc]
             past_key_values_{i}_decoder_key / _value [batch, heads, past, head_dim]
             past_key_values_{i}_encoder_key / _value [batch, heads, enc, head_dim]
    outputs  logits [batch, seq, vocab]
             present.{i}.decoder.key / .value [batch, heads, past + seq, head_dim]

The cross-attention keys and values depend only on the encoder's output, so the encoder program
computes them once (it runs the decoder on the start token and keeps only its cross cache; the rest is
dead code), and every decoder step reads them from a ``transformers.EncoderDecoderCache`` marked as
filled. Decoder inputs are never padded (the start token, then one token per step), so the
self-attention mask is causal over ``past + seq`` and positions come from the cache length, as in
Hugging Face ``generate``. Both forwards replace the model's ``forward`` on the instance; module
paths are unchanged, so adapters match as on the plain model and PEFT runs the same programs.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import torch

from peftc import ir
from peftc.errors import UnsupportedError
from peftc.ir import meta
from peftc.loaders.causal import step_mask
from peftc.loaders.inputs import DimSpec, InputSignature, TensorInput

TEXT2TEXT = "text2text-generation"
ENCODER = "text2text-generation-encoder"
"""The task of the encoder program, compiled into ``encoder/`` of a ``text2text-generation`` artifact."""
ENCODER_DIR = "encoder"
TASKS = (TEXT2TEXT, ENCODER)


def past_name(layer: int, part: str, kind: str) -> str:
    """The decoder-step input of layer ``layer``'s ``part`` (``decoder``/``encoder``) ``kind`` (``key``/``value``)."""
    return f"past_key_values_{layer}_{part}_{kind}"


def present_name(layer: int, part: str, kind: str) -> str:
    """The output holding layer ``layer``'s ``part`` ``kind`` cache (optimum's ``present.{i}.decoder.key``)."""
    return f"present.{layer}.{part}.{kind}"


def attach(module: torch.nn.Module, task: str) -> InputSignature:
    """Make ``module`` run the ``task`` program (the module docstring); return its signature.

    Raises:
        UnsupportedError: not a Hugging Face encoder-decoder model with a cross-attention cache.
    """
    name = type(module).__name__
    config = getattr(module, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(getattr(module, "get_encoder", None)):
        raise UnsupportedError(
            f"--task {TEXT2TEXT}: {name} is not an encoder-decoder model (text2text generation needs a "
            "Hugging Face …ForConditionalGeneration class with config.is_encoder_decoder)"
        )
    if "input_ids" not in inspect.signature(module.get_encoder().forward).parameters:
        raise UnsupportedError(
            f"--task {TEXT2TEXT}: {name}'s encoder takes no input_ids (not a text encoder); describe its inputs "
            "with --input to compile its plain forward"
        )
    if getattr(config, "decoder_start_token_id", None) is None:
        raise UnsupportedError(f"--task {TEXT2TEXT}: {name}'s config gives no decoder_start_token_id")
    layers = _cache_layout(module)
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    dims = {
        "batch": DimSpec("batch"),
        "enc": DimSpec("enc", 1, longest),
        "seq": DimSpec("seq", 1, longest),
        "past": DimSpec("past", 0, longest - 1),
    }
    vocab = int(config.vocab_size)
    if task == ENCODER:
        inputs = [
            TensorInput("input_ids", ("batch", "enc"), "int64", "index", 0, vocab),
            TensorInput("attention_mask", ("batch", "enc"), "int64", "mask"),
        ]
        body, names = _encoder_forward, ["input_ids", "attention_mask"]
        dims = {k: v for k, v in dims.items() if k in ("batch", "enc")}
    else:
        inputs = [
            TensorInput("input_ids", ("batch", "seq"), "int64", "index", 0, vocab),
            TensorInput("encoder_attention_mask", ("batch", "enc"), "int64", "mask"),
        ]
        for index, (heads, width) in enumerate(layers):
            for part, length in (("decoder", "past"), ("encoder", "enc")):
                shape = ("batch", heads, length, width)
                inputs += [TensorInput(past_name(index, part, k), shape, "float32") for k in ("key", "value")]
        body, names = _decoder_forward, ["input_ids", "encoder_attention_mask"]

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return body(self, len(layers), *args, **kwargs)

    forward.__signature__ = _signature(names, [i.name for i in inputs[len(names) :]])  # type: ignore[attr-defined]
    module.forward = types.MethodType(forward, module)
    return InputSignature(tuple(inputs), dims)


def _caches(config: Any, pasts: list[tuple[torch.Tensor, torch.Tensor]] | None = None, cross: Any = None) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    own = DynamicCache(pasts, config=config) if pasts is not None else DynamicCache(config=config)
    return EncoderDecoderCache(
        own, DynamicCache(cross, config=config) if cross is not None else DynamicCache(config=config)
    )


def _cache_layout(module: torch.nn.Module) -> list[tuple[int, int]]:
    """``(heads, head_dim)`` of each decoder layer's caches, from one eager step."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = module(input_ids=ids, decoder_input_ids=ids[:, :1], cache=_caches(module.config), use_cache=True)
    cache = getattr(out, "cache", None)
    layers = getattr(getattr(cache, "cross_attention_cache", None), "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise UnsupportedError(f"--task {TEXT2TEXT}: {type(module).__name__} keeps no cross-attention cache")
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]


def _signature(names: list[str], keywords: list[str]) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind) for n in ["self", *names]]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in keywords]
    return inspect.Signature(params)


def _no_extras(named: dict[str, Any]) -> None:
    """PEFT's seq2seq model passes its own keyword arguments (all None here)."""
    given = sorted(k for k, v in named.items() if v is not None)
    if given:
        raise TypeError(f"unexpected inputs {given}")


def _padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive ``[batch, 1, 1, enc]`` mask of the encoder's keys (the dtype's most negative value on padding)."""
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask[:, None, None, :] != 0, zero, torch.finfo(dtype).min)


def _encoder_forward(
    self: torch.nn.Module, layers: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, **named: Any
) -> dict[str, torch.Tensor]:
    """The encoder's output and every decoder layer's cross-attention K/V of it."""
    _no_extras(named)
    hidden = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    start = torch.full_like(input_ids[:, :1], int(self.config.decoder_start_token_id))
    out = type(self).forward(
        self, encoder_outputs=(hidden,), attention_mask=attention_mask, decoder_input_ids=start,
        cache=_caches(self.config), use_cache=True,
    )  # fmt: skip
    result = {"last_hidden_state": hidden}
    for index, layer in enumerate(out.cache.cross_attention_cache.layers[:layers]):
        result[present_name(index, "encoder", "key")] = layer.keys
        result[present_name(index, "encoder", "value")] = layer.values
    return result


def _decoder_forward(
    self: torch.nn.Module, layers: int, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor, **named: Any
) -> dict[str, torch.Tensor]:
    """One decoder step over the cached cross K/V (the module docstring)."""
    own = [
        (named.pop(past_name(i, "decoder", "key")), named.pop(past_name(i, "decoder", "value"))) for i in range(layers)
    ]
    cross = [
        (named.pop(past_name(i, "encoder", "key")), named.pop(past_name(i, "encoder", "value"))) for i in range(layers)
    ]
    _no_extras(named)
    cache = _caches(self.config, own, cross)
    for index in range(layers):
        cache.is_updated[index] = True  # the cross K/V are given: no layer recomputes them
    dtype = cross[0][0].dtype
    batch, seq = input_ids.shape
    total = own[0][0].shape[2] + seq
    mask = step_mask(torch.ones(batch, total, dtype=torch.long, device=input_ids.device), seq, dtype)
    # Cross-attention reads only the cache; its states' shape (batch, enc) still sizes the masks.
    states = cross[0][0].new_zeros(batch, cross[0][0].shape[2], int(self.config.d_model))
    out = type(self).forward(
        self, encoder_outputs=(states,), attention_mask=_padding_mask(encoder_attention_mask, dtype),
        decoder_input_ids=input_ids, decoder_attention_mask=mask, cache=cache, use_cache=True,
    )  # fmt: skip
    result = {"logits": out.logits}
    for index, layer in enumerate(out.cache.self_attention_cache.layers[:layers]):
        result[present_name(index, "decoder", "key")] = layer.keys
        result[present_name(index, "decoder", "value")] = layer.values
    return result


def live_table(program: ir.Program, table: ir.ModuleTable) -> ir.ModuleTable:
    """``table`` (``program``'s modules) without the modules no output of ``program`` depends on.

    The encoder program runs the decoder on the start token for its cross K/V; the rest of that step
    (self-attention, feed-forward, the cross-attention queries) reaches only asserts and dropouts. A
    swappable artifact gives each program slots for the modules it needs (ONNX drops dead slot inputs).
    """
    output = next(n for n in reversed(program.graph.nodes) if n.op == "output")
    live, todo = {output}, [output]
    while todo:
        for node in todo.pop().all_input_nodes:
            if node not in live:
                live.add(node)
                todo.append(node)
    needed = {path for node in live for _, path, _ in meta.module_stack(node)}
    kept = {path: info for path, info in table.items() if path in needed}
    return ir.ModuleTable(kept, table.state_shapes, table.tensors)


def split_keys(source: Any, runs: set[str], model: torch.nn.Module) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """``source`` without the keys of modules this program does not run but the other one does, and
    those keys with why (the adapter's ``unused`` keys of this program).

    A decoder step never runs the encoder nor the cross-attention key/value projections (the encoder
    program computes them); a key whose module is in ``model`` but not among ``runs`` (the modules this
    program executes; for a swappable one, those its outputs need: :func:`live_table`) is the other
    program's. Keys naming no module of ``model`` stay, so the parser still refuses them.
    """
    from peftc.methods.common import PREFIX

    names = {name for name, _ in model.named_modules() if name}
    kept, moved = {}, []
    for key, tensor in source.tensors.items():
        parts = key.removeprefix(PREFIX).split(".")
        owner = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in names), None)
        if owner is not None and owner not in runs:
            moved.append((key, f"module {owner!r} runs in the other program of this {TEXT2TEXT} artifact"))
        else:
            kept[key] = tensor
    return dataclasses.replace(source, tensors=kept), tuple(moved)
