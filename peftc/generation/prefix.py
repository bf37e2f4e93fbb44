"""Prefix tuning in a ``--task text-generation`` artifact: the prefix is the head of the KV cache
(prompt tuning's virtual tokens are a head too: ``prompt_head.py``; this module stores and reads both).

A ``PREFIX_TUNING`` (or ``CARTRIDGE``) adapter with ``task_type="CAUSAL_LM"`` changes nothing in the
model: PEFT (``PeftModelForCausalLM.prepare_inputs_for_generation``, ``peft/peft_model.py``) starts
generation with the cache ``get_prompt`` builds, extends the attention mask with ones for its
``n`` virtual tokens and adds ``n`` to the position ids transformers derives from the prompt's mask.
So the artifact is the *base* model's generation step (``peftc/loaders/causal.py``), and the prefix
is data beside it: ``prefix.safetensors`` (listed with its sha256 in the manifest) holds each layer's
keys and values ``[kv_heads, n, head_dim]`` under the step's input names, and the manifest's
``target.prefix`` gives the file and ``n``. ``runner.generate`` feeds them as the first ``past``.

The rows are the file's ``prompt_embeddings`` ``[n, 2·L·kv_width]`` (with ``prefix_projection`` PEFT
ran the MLP when it saved them, as its ``get_prompt`` does at run time), viewed as ``[n, 2L, H, d]``:
layer ``l``'s keys are row block ``2l``, its values ``2l + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftc.artifact.files import listed, read_verified, records
from peftc.errors import InputError, UnsupportedError, first_line
from peftc.generation import prompt_head
from peftc.loaders.causal import TEXT_GENERATION, key_name, value_name
from peftc.methods.base import AdapterSource

FILE = "prefix.safetensors"
TYPES = ("PREFIX_TUNING", "CARTRIDGE")
"""The ``peft_type``s PEFT starts generation with a prefix cache for."""


MASK, COLUMNS = "mask", "columns"
"""How ``runner.generate`` numbers the prompt after a head (the manifest's ``target.prefix.positions``):
a prefix's PEFT shifts transformers' positions of the prompt's mask by ``n``; prompt learning's drops
position ids, so the model numbers every column after the ``n`` virtual ones (``prompt_head.py``)."""


def generating(read: Sequence[AdapterSource], task_id: int | None = None) -> AdapterSource | None:
    """The first of ``read`` that PEFT generates with from a cache head (a ``CAUSAL_LM`` prefix, or a
    ``CAUSAL_LM`` prompt: ``prompt_head.generating``), else None."""
    for source in read:
        prefixed = source.config.get("peft_type") in TYPES and source.config.get("task_type") == "CAUSAL_LM"
        if prefixed or prompt_head.generating(source, task_id):
            return source
    return None


def positions(source: AdapterSource) -> str:
    """How the prompt is numbered after ``source``'s head: :data:`MASK` for a prefix, else :data:`COLUMNS`."""
    return MASK if source.config.get("peft_type") in TYPES else COLUMNS


def head(
    source: AdapterSource, read: Sequence[AdapterSource], layout: Sequence[tuple[int, int]], stack: bool, kind: str
) -> dict:
    """The prefix's keys and values per layer, fp32 ``[kv_heads, n, head_dim]`` named as the step's inputs
    (``layout``: the step's ``(kv_heads, head_dim)`` per layer; ``kind``: the model's ``model_type``).

    Raises:
        UnsupportedError: the prefix with other adapters or ``--swappable``, a model PEFT gives another
            cache, or a config whose layers and heads are not the model's cache layout.
    """
    from peftc.methods.prompt import prefix

    where = str(source.config_path)
    if kind in prefix.OTHER_CACHES:
        raise UnsupportedError(f"{where}: prefix tuning on {kind!r}: PEFT builds another cache for it (not supported)")
    if len(read) != 1 or not stack:
        raise UnsupportedError(
            f"{where}: --task {TEXT_GENERATION} with a prefix: compile the prefix alone (no other adapter, "
            "no --swappable)"
        )
    rows = prefix.read(source).prompt.tensor.detach().float()
    layers, heads = int(source.config["num_layers"]), int(source.config["num_attention_heads"])
    width = rows.shape[1] // (2 * layers)
    if layers != len(layout) or any(shape != (heads, width // heads) for shape in layout):
        raise UnsupportedError(
            f"{where}: num_layers={layers}, num_attention_heads={heads} do not fit the model's cache of "
            f"{len(layout)} layers of (kv_heads, head_dim) {layout[0] if layout else None}"
        )
    blocks = rows.reshape(rows.shape[0], 2 * layers, heads, width // heads).permute(1, 2, 0, 3).contiguous()
    kv = {}
    for layer in range(layers):
        kv[key_name(layer)], kv[value_name(layer)] = blocks[2 * layer], blocks[2 * layer + 1]
    return kv


def write(kv: dict, directory: Path, numbered: str = MASK) -> dict[str, Any]:
    """Write ``kv`` to ``directory/FILE``; the manifest's ``target.prefix`` record (``numbered``: :func:`positions`)."""
    from safetensors.torch import save_file

    save_file(kv, str(directory / FILE))
    return {"file": FILE, "virtual_tokens": int(next(iter(kv.values())).shape[1]), "positions": numbered}


def numbering(runner: Any) -> str:
    """How ``runner``'s artifact numbers the prompt after its head (:data:`MASK` when the record predates the field)."""
    record = runner.manifest.target.get("prefix") or {}
    numbered = record.get("positions", MASK) if isinstance(record, dict) else MASK
    if numbered not in (MASK, COLUMNS):
        raise InputError(f"{runner.path}/manifest.json: target.prefix.positions should be {MASK!r} or {COLUMNS!r}")
    return numbered


def read_head(runner: Any, dtype: Any) -> tuple[int, dict[str, np.ndarray]]:
    """The artifact's prefix: ``n`` and the keys and values per input name (``0, {}`` without one).

    The file must be one ``target.files`` lists (a plain path inside the artifact), is checked against its
    sha256 as it is read, and holds ``[kv_heads, n, head_dim]`` tensors with ``n`` the recorded count.

    Raises:
        InputError: a malformed ``target.prefix``, a file the artifact lacks or does not list, a modified
            or malformed file.
    """
    target = runner.manifest.target
    record = target.get("prefix")
    if not record:
        return 0, {}
    where = f"{runner.path}/manifest.json: target.prefix"
    count = record.get("virtual_tokens") if isinstance(record, dict) else None
    if type(count) is not int or count < 1 or not isinstance(record.get("file"), str):
        raise InputError(f"{where} should be {{file: a path, virtual_tokens: an integer >= 1}}, got {record!r}"[:300])
    path = listed(runner.path, target, record["file"])
    if not path.is_file():
        raise InputError(f"{path}: the prefix file the manifest lists is missing")
    from safetensors.numpy import load

    try:
        tensors = load(read_verified(path, records(target)[record["file"]]))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a valid safetensors file ({first_line(e)})") from e
    for key, value in tensors.items():
        if value.ndim != 3 or value.shape[1] != count or value.dtype.kind != "f":
            raise InputError(
                f"{path}: {key} is {value.dtype} {list(value.shape)}, expected [kv_heads, {count}, head_dim]"
            )
    return count, {k: v.astype(dtype) for k, v in tensors.items()}


def expanded(kv: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Each ``[kv_heads, n, head_dim]`` prefix repeated for ``batch`` rows."""
    return {name: np.ascontiguousarray(np.broadcast_to(v, (batch, *v.shape))) for name, v in kv.items()}
