"""``runner.generate`` for ``--task text2text-generation`` artifacts: the encoder once, then decoder steps.

The encoder program (``encoder/`` of the artifact) runs the prompt once and gives every decoder layer's
cross-attention keys and values; each decoder step feeds them unchanged with the encoder's attention
mask, the tokens of the step (the config's ``decoder_start_token_id`` first, then the token chosen)
and the previous step's ``present.{i}.decoder.*`` as ``past_key_values_{i}_decoder_*``. The result is
what Hugging Face ``generate`` returns for an encoder-decoder model: the decoder's tokens, starting
with the start token. Token choice (greedy, or seeded sampling) and ``eos_token_id`` / ``pad_token_id``
are those of ``peftc/generation/decode.py``. A swappable artifact's ``adapter=`` (a name, or one per
row) goes to the encoder program and to every decoder step alike (``peftc/swap/pair.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from peftc.errors import InputError
from peftc.generation import decode
from peftc.loaders.inputs import InputSignature
from peftc.loaders.seq2seq import past_name, present_name


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
    """``[batch, 1 + new]`` decoder tokens for the prompts ``input_ids`` (padded where ``attention_mask`` is 0).

    Raises:
        InputError: bad prompt shapes, or more new tokens than the decoder's positions.
    """
    as_torch = isinstance(input_ids, torch.Tensor)
    ids, mask = decode.prompt_arrays(input_ids, attention_mask)
    signature = InputSignature.from_json(runner.manifest.target["signature"])
    longest = int(signature.dims["seq"].max)
    decode.check_options(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    if max_new_tokens + 1 > longest:
        raise InputError(f"max_new_tokens={max_new_tokens}: the decoder has {longest} positions (start token included)")
    sample_with = functools.partial(
        decode.sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=decode.seeded(seed)
    )
    encoded = runner.encoder(input_ids=ids, attention_mask=mask, **(call or {}))
    batch, pasts = ids.shape[0], {}
    for spec in signature.inputs:
        if spec.name.startswith("past_key_values_") and "_decoder_" in spec.name:
            layer, kind = int(spec.name.split("_")[3]), spec.name.rsplit("_", 1)[1]
            width = np.asarray(encoded[present_name(layer, "encoder", kind)])
            pasts[spec.name] = np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype=width.dtype)
            pasts[past_name(layer, "encoder", kind)] = width
    start = int(runner.manifest.target["generation"]["decoder_start_token_id"])
    tokens, finished = np.full((batch, 1), start, dtype=np.int64), np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        out = runner(input_ids=tokens[:, -1:], encoder_attention_mask=mask, **pasts, **(call or {}))
        chosen = decode.pick(out, finished, pad_token_id, sample_with if do_sample else None)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        if eos_token_id is not None:
            finished |= chosen == eos_token_id
            if finished.all():
                break
        pasts = _next_pasts(out, pasts)
    return torch.from_numpy(tokens) if as_torch else tokens


def _next_pasts(out: Mapping[str, Any], pasts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The caches of the next step: this step's self-attention ``present.{i}.decoder.*``; the cross K/V as they were."""
    nxt = dict(pasts)
    for name in pasts:
        if "_decoder_" in name:
            layer, kind = int(name.split("_")[3]), name.rsplit("_", 1)[1]
            nxt[name] = np.asarray(out[present_name(layer, "decoder", kind)])
    return nxt
