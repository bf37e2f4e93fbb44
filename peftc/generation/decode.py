"""``runner.generate``: the token loop around a ``--task text-generation`` artifact.

One prefill step runs the whole prompt with empty caches (``past`` = 0); each decode step feeds the
last token, the mask grown by one column, its position and the previous step's ``present.*`` as
``past_key_values_*``. Positions follow Hugging Face ``generate`` for left padding: the running count
of unmasked tokens minus one (1 on padding). An artifact with a cache head (``prefix.py``) starts with
it as the past, the mask led by its ``n`` ones and the positions PEFT gives: a prefix's shift the
prompt's by ``n``; a prompt's (``prompt_head.py``) number the columns after it, padding counted. A row
that produced ``eos_token_id`` is finished: it gets ``pad_token_id`` from then on, and the loop stops
when every row is finished. An AOTInductor artifact's decode steps (not the prefill, and not with an
``adapter=`` choice) go through its runner's ``run_tensors``: the caches are passed on as the package
returned them, so a bf16 package's are not widened to fp32 and cast back at every step.

Greedy (``do_sample=False``) picks the arg-max of the last position's logits. Sampling divides them by
``temperature``, keeps the ``top_k`` largest, then the smallest set whose probability reaches
``top_p``, and draws from a ``torch.Generator`` seeded with ``seed``: the same seed gives the same
tokens, but not the tokens Hugging Face's sampling draws (its random stream is another one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from peftc import arguments
from peftc.errors import InputError
from peftc.generation import prefix
from peftc.loaders.causal import key_name, value_name
from peftc.loaders.inputs import InputSignature
from peftc.seeds import check_seed

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}


def generate(
    runner: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    call: Mapping[str, Any] | None = None,
) -> Any:
    """The prompt followed by up to ``max_new_tokens`` generated tokens per row (see the module docstring).

    Args:
        runner: a :class:`peftc.runtime.Runner` of a ``--task text-generation`` artifact.
        call: extra keyword arguments of every step (``adapter=`` of a swappable artifact).

    Raises:
        InputError: not a generation artifact, or a prompt and length beyond the model's positions.
    """
    as_torch = isinstance(input_ids, torch.Tensor)
    ids, mask = prompt_arrays(input_ids, attention_mask)
    layers, shapes, dtype, longest = _layout(runner)
    count, head = prefix.read_head(runner, dtype)
    numbered = prefix.numbering(runner)
    check_options(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    if count + ids.shape[1] + max_new_tokens > longest:
        virtual = f"{count} virtual tokens + " if count else ""
        raise InputError(
            f"{virtual}a prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"{longest} positions (max_position_embeddings)"
        )
    sample_with = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=seeded(seed))
    batch = ids.shape[0]
    pasts = {}
    for index in range(layers):
        for name in (key_name(index), value_name(index)):
            pasts[name] = np.zeros((batch, shapes[index][0], 0, shapes[index][1]), dtype=dtype)
    pasts.update(prefix.expanded(head, batch))
    ones = np.ones((batch, count), dtype=mask.dtype)  # the prefix's columns of the mask
    tokens, finished = ids, np.zeros(batch, dtype=bool)
    step_ids, positions = ids, _step_positions(mask, count, numbered)
    native = None if call else getattr(getattr(runner, "backend_runner", None), "run_tensors", None)
    for step in range(max_new_tokens):
        full = np.concatenate([ones, mask], axis=1)
        feeds = {"input_ids": step_ids, "attention_mask": full, "position_ids": positions, **pasts}
        out = runner(**feeds, **(call or {})) if native is None or step == 0 else native_step(native, feeds)
        chosen = pick(out, finished, pad_token_id, sample_with if do_sample else None)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        if eos_token_id is not None:
            finished |= chosen == eos_token_id
            if finished.all():
                break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        step_ids, positions = chosen[:, None], _step_positions(mask, count, numbered)[:, -1:]
        pasts = _next_pasts(out, pasts)
    return torch.from_numpy(tokens) if as_torch else tokens


def seeded(seed: int | None) -> torch.Generator:
    """The sampling stream of a generation (seed 0 when None)."""
    if seed is not None:
        check_seed(seed, "seed")
    return torch.Generator().manual_seed(0 if seed is None else seed)


def pick(
    out: Mapping[str, Any], finished: np.ndarray, pad_token_id: int | None, sample_with: Callable[..., Any] | None
) -> np.ndarray:
    """Each row's next token from a step's ``logits`` at the last position: sampled with ``sample_with``
    (None: greedy); ``pad_token_id`` for rows already ``finished``."""
    logits = torch.from_numpy(np.asarray(out["logits"])[:, -1, :].astype(np.float32))
    chosen = (sample_with(logits) if sample_with else logits.argmax(-1)).numpy().astype(np.int64)
    return np.where(finished, pad_token_id, chosen) if pad_token_id is not None else chosen


def _next_pasts(out: Mapping[str, Any], pasts: Mapping[str, Any]) -> dict[str, Any]:
    """The caches of the next step: this step's ``present.*`` outputs (tensors stay tensors)."""
    return {name: _kept(out[_present(name)]) for name in pasts}


def _kept(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else np.asarray(value)


def native_step(run_tensors: Callable[..., dict[str, torch.Tensor]], feeds: Mapping[str, Any]) -> dict[str, Any]:
    """A decode step through a runner's unchecked ``run_tensors`` (the prefill went through the checked
    call, and the loop builds every later feed itself): the caches stay in the package's dtype from one
    step to the next, and only the last position's logits are widened to a float32 array."""
    tensors = {
        k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()
    }
    out = dict(run_tensors(tensors))
    out["logits"] = out["logits"][:, -1:].float().numpy()
    return out


def _present(name: str) -> str:
    """The output that becomes input ``name`` at the next step: ``past_key_values_0_key`` ← ``present.0.key``."""
    return "present" + name.removeprefix("past_key_values").replace("_", ".")


def prompt_arrays(input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """The prompts' ids and mask as int64 ``[batch, length]`` arrays (a mask of ones when None).

    Raises:
        InputError: not integers, not 2-D, empty, or a mask of another shape.
    """
    ids = int_array(input_ids, "input_ids")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids: shape {list(ids.shape)}, expected [batch, prompt length >= 1]")
    mask = np.ones_like(ids) if attention_mask is None else int_array(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask: shape {list(mask.shape)}, input_ids' is {list(ids.shape)}")
    return ids, mask


def int_array(value: Any, name: str) -> np.ndarray:
    """``value`` (a tensor or array-like of integers) as an int64 numpy array.

    Raises:
        InputError: not integers (the message names the input ``name``).
    """
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        raise InputError(f"{name}: dtype {array.dtype}, expected integers")
    return array.astype(np.int64)


def _positions(mask: np.ndarray) -> np.ndarray:
    """Hugging Face ``generate``'s positions: running count of unmasked tokens - 1; 1 on padding."""
    return np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1).astype(np.int64)


def _prefix_positions(mask: np.ndarray, count: int) -> np.ndarray:
    """PEFT's positions after a prefix of ``count`` virtual tokens: transformers' positions of the prompt's
    own mask (running count - 1, 0 on padding) + ``count``."""
    return (np.where(mask == 0, 0, np.cumsum(mask, axis=1) - 1) + count).astype(np.int64)


def column_positions(mask: np.ndarray, count: int) -> np.ndarray:
    """PEFT's positions after a prompt of ``count`` virtual tokens (``prompt_head.py``): ``count`` + the
    column, padding counted."""
    return np.broadcast_to(np.arange(mask.shape[1], dtype=np.int64) + count, mask.shape).copy()


def _step_positions(mask: np.ndarray, count: int, numbered: str = prefix.MASK) -> np.ndarray:
    """The positions of ``mask``'s tokens: after a head, :func:`_prefix_positions` or :func:`column_positions`
    (``numbered``: ``prefix.numbering``), else :func:`_positions`."""
    if not count:
        return _positions(mask)
    return column_positions(mask, count) if numbered == prefix.COLUMNS else _prefix_positions(mask, count)


def _layout(runner: Any) -> tuple[int, list[tuple[int, int]], Any, int]:
    """Layers, ``(kv_heads, head_dim)`` per layer, the cache dtype and the longest sequence of ``runner``'s
    artifact.

    Raises:
        InputError: the artifact does not take KV caches (not compiled with ``--task text-generation``).
    """
    manifest = runner.manifest
    if key_name(0) not in runner.input_names:
        raise InputError(
            f"{runner.path}: not a generation artifact (its inputs are {runner.input_names}); "
            "compile the causal LM with --task text-generation"
        )
    signature = InputSignature.from_json(manifest.target["signature"])
    specs = {s.name: s for s in signature.inputs}
    layers = sum(1 for name in specs if name.startswith("past_key_values_") and name.endswith("_key"))
    shapes = [(int(specs[key_name(i)].shape[1]), int(specs[key_name(i)].shape[3])) for i in range(layers)]
    return layers, shapes, _DTYPES[specs[key_name(0)].dtype], int(signature.dims["seq"].max)


def check_options(
    max_new_tokens: Any,
    do_sample: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    eos_token_id: Any = None,
    pad_token_id: Any = None,
) -> None:
    """The generation options of a call, each of its type and range (``--max-new-tokens``, ``--top-p``…).

    Raises:
        InputError: naming the option and what it takes.
    """
    if arguments.integer(max_new_tokens, "max_new_tokens") < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: give at least 1 new token")
    arguments.flag(do_sample, "do_sample")
    arguments.number(temperature, "temperature")
    if do_sample and not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature={temperature}: give a finite positive temperature (or do_sample=False)")
    if arguments.integer(top_k, "top_k", optional=True) is not None and top_k < 0:
        raise InputError(f"top_k={top_k}: give a count >= 0 (0 or None: no limit)")
    if arguments.number(top_p, "top_p", optional=True) is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p}: give a probability in (0, 1] (None: no limit)")
    for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if arguments.integer(token, name, optional=True) is not None and token < 0:
            raise InputError(f"{name}={token}: give a token id >= 0 (or None)")


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """One token per row drawn from ``softmax(logits / temperature)`` restricted by ``top_k`` and ``top_p``."""
    scores = logits / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep up to and including the token reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
