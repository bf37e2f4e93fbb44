"""Prompt tuning, P-tuning and CPT in a ``--task text-generation`` artifact: the virtual tokens' keys and
values are the head of the KV cache, as a prefix's are (``prefix.py``).

PEFT's ``PeftModelForCausalLM.forward`` (``peft/peft_model.py``) runs these adapters as::

    inputs_embeds  = cat(P, word_embeddings(input_ids))       P: [n, d] for every row
    attention_mask = cat(ones(batch, n), attention_mask)
    position_ids   = None  (PEFT drops the ones it is given)
    outputs        = base(inputs_embeds=…, attention_mask=…)

so the model numbers every column: the virtual tokens are positions ``0 … n-1`` and the prompt's
column ``j`` is position ``n + j``, padding counted. Under causal attention the virtual tokens see only
each other, so their keys and values in every layer do not depend on the prompt: peftc computes them
once at compile time, running the *base* model (its own forward, fp32) on ``P`` at positions
``0 … n-1``, and stores them as the cache's head (``prefix.safetensors``, positions ``columns``).
``runner.generate`` then feeds the prompt's columns at positions ``n + j`` and each new token at the
next column, as PEFT's forward over the whole sequence does.

``P`` is the saved ``prompt_embeddings``: P-tuning's prompt encoder ran when PEFT saved it (its
``get_prompt`` uses those rows as they are in inference mode), CPT's file holds the projected prompt.
Multitask prompt tuning scales ``P`` per row by the row's task (``task_ids``); with ``--task-id K`` the
task is fixed at compile time, ``P_K = P ⊙ (prefix_task_cols[K] @ prefix_task_rows[K])``, and the head
is that task's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.loaders.causal import TEXT_GENERATION, key_name, value_name
from peftc.methods.base import AdapterSource

TYPES = ("PROMPT_TUNING", "P_TUNING", "CPT")
"""The ``peft_type``s whose ``CAUSAL_LM`` prompt becomes a cache head."""
MULTITASK = "MULTITASK_PROMPT_TUNING"
"""A cache head too, for the one task ``--task-id`` fixes."""


def generating(source: AdapterSource, task_id: int | None) -> bool:
    """Whether ``source`` is a ``CAUSAL_LM`` prompt PEFT generates with from a fixed ``P`` (multitask:
    only with a ``task_id``)."""
    kind = source.config.get("peft_type")
    fixed = kind in TYPES or (kind == MULTITASK and task_id is not None)
    return fixed and source.config.get("task_type") == "CAUSAL_LM"


def head(
    source: AdapterSource, read: Sequence[AdapterSource], module: torch.nn.Module, stack: bool, task_id: int | None
) -> dict[str, torch.Tensor]:
    """The virtual tokens' keys and values per layer, fp32 ``[kv_heads, n, head_dim]`` named as the step's
    inputs, from ``module`` (the causal LM; its class's forward, not the generation step).

    Raises:
        UnsupportedError: the prompt with other adapters or ``--swappable``, ``modules_to_save`` copies,
            or a prompt width other than the word embedding's.
        InputError: a ``task_id`` outside ``[0, num_tasks)``.
    """
    from transformers import DynamicCache

    from peftc.methods.prompt import parse

    where = str(source.config_path)
    if len(read) != 1 or not stack:
        raise UnsupportedError(
            f"{where}: --task {TEXT_GENERATION} with a prompt: compile the prompt alone (no other adapter, "
            "no --swappable)"
        )
    spec = parse.read(source)
    if spec.saved:
        raise UnsupportedError(
            f"{source.describe(spec.saved[0])}: a modules_to_save copy with --task {TEXT_GENERATION}: not supported "
            "(the step is the base model's)"
        )
    rows = spec.prompt.tensor.detach().float()
    parse.embedding_path(source, module, rows.shape[1])
    if spec.tasks is not None:
        rows = rows * task_scale(source, spec.tasks[0].tensor, spec.tasks[1].tensor, task_id)
    dtype = next(module.parameters()).dtype
    positions = torch.arange(rows.shape[0])[None]
    with torch.no_grad():
        out = type(module).forward(
            module,
            inputs_embeds=rows[None].to(dtype),
            position_ids=positions,
            cache=DynamicCache(config=module.config),
            use_cache=True,
        )
    kv = {}
    for layer, cached in enumerate(out.cache.layers):
        kv[key_name(layer)] = cached.keys[0].float().contiguous()
        kv[value_name(layer)] = cached.values[0].float().contiguous()
    return kv


def task_scale(source: AdapterSource, cols: torch.Tensor, rows: torch.Tensor, task_id: int | None) -> torch.Tensor:
    """Multitask prompt tuning's ``prefix_task_cols[K] @ prefix_task_rows[K]`` ``[n, d]`` for ``K = task_id``.

    Raises:
        InputError: ``task_id`` outside ``[0, num_tasks)``.
    """
    tasks = int(cols.shape[0])
    if task_id is None or not 0 <= task_id < tasks:
        raise InputError(f"--task-id {task_id}: {source.config_path} has num_tasks={tasks}; give one in [0, {tasks})")
    return cols[task_id].float() @ rows[task_id].float()
