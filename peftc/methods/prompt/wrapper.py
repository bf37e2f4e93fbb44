"""The module a prompt-learning adapter is traced in: the base model behind PEFT's input wiring.

PEFT's ``PeftModelFor<task>.forward`` (``peft/peft_model.py``) runs prompt tuning, P-tuning,
multitask prompt tuning and CPT as::

    inputs_embeds  = cat(P, word_embeddings(input_ids))          P: [batch, n, d], the same per row
    attention_mask = cat(ones(batch, n), attention_mask)           (fp32 ones; the cat promotes the mask)
    token_type_ids = cat(zeros(batch, n), token_type_ids).long()   SEQ_CLS, TOKEN_CLS, QUESTION_ANS;
                     left out (the model's default: zeros)          FEATURE_EXTRACTION, CAUSAL_LM
    outputs        = base(inputs_embeds=…, attention_mask=…[, token_type_ids=…])

``P`` is the saved ``prompt_embeddings`` ``[n, d]`` (P-tuning saves its prompt encoder's output, so
the encoder ran when PEFT saved the adapter). Multitask prompt tuning scales it per row by the row's
task ``t`` (the ``task_ids`` input): ``P_b = prompt_embeddings ⊙ (prefix_task_cols[t_b] @
prefix_task_rows[t_b])``. The virtual positions come first, so positions of the real tokens shift by
``n``, and outputs per position keep the ``n`` virtual ones in front, as PEFT returns them.

:class:`Prompted` holds the base as ``base_model`` and the adapter's tensors under their file names,
so the traced program names them as PEFT's checkpoint does (``prompt_embeddings``,
``base_model.classifier.weight``…).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from peftc.errors import UnsupportedError
from peftc.loaders.inputs import InputSignature, TensorInput

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The base inputs the wrapper wires; it adds ``task_ids`` for multitask prompt tuning."""
TASK_IDS = "task_ids"


class Prompted(torch.nn.Module):
    """``base`` with ``prompt`` prepended to its input embeddings (see the module docstring)."""

    def __init__(
        self,
        base: torch.nn.Module,
        embeddings: str,
        prompt: torch.Tensor,
        *,
        token_types: bool,
        tasks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Args:
        base: the base model (its forward takes ``inputs_embeds``).
        embeddings: the path of its word embedding module, as PEFT finds it (:func:`word_embeddings`).
        prompt: ``prompt_embeddings`` ``[n, d]``.
        token_types: extend ``token_type_ids`` with zeros (else the model gets none, its default).
        tasks: multitask prompt tuning's ``(prefix_task_cols, prefix_task_rows)``.
        """
        super().__init__()
        self.base_model = base
        self.embeddings = embeddings
        self.token_types = token_types
        self.prompt_embeddings = torch.nn.Parameter(prompt.detach().clone(), requires_grad=False)
        self.tasks = tasks is not None
        if tasks is not None:
            self.prefix_task_cols = torch.nn.Parameter(tasks[0].detach().clone(), requires_grad=False)
            self.prefix_task_rows = torch.nn.Parameter(tasks[1].detach().clone(), requires_grad=False)

    def prompts(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """``P``: ``[batch, n, d]`` in the prompt's dtype."""
        prompt = self.prompt_embeddings.unsqueeze(0).expand(batch, -1, -1)
        if not self.tasks:
            return prompt
        # Rows picked as embedding lookups (PEFT: index_select, the same values), so the artifact records
        # task_ids' range [0, num_tasks) as it does the vocabulary's and refuses ids outside it.
        cols = self._rows(self.prefix_task_cols, task_ids)
        rows = self._rows(self.prefix_task_rows, task_ids)
        return prompt * torch.matmul(cols, rows)

    @staticmethod
    def _rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, table.flatten(1)).view(ids.shape[0], *table.shape[1:])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> Any:
        batch, count = input_ids.shape[0], self.prompt_embeddings.shape[0]
        embeds = self.base_model.get_submodule(self.embeddings)(input_ids)
        embeds = torch.cat((self.prompts(batch, task_ids).to(embeds.dtype), embeds), dim=1)
        extra = {}
        if attention_mask is not None:
            ones = torch.ones(batch, count, dtype=torch.float32, device=attention_mask.device)
            extra["attention_mask"] = torch.cat((ones, attention_mask), dim=1)
        if self.token_types and token_type_ids is not None:
            zeros = torch.zeros(batch, count, dtype=torch.float32, device=token_type_ids.device)
            extra["token_type_ids"] = torch.cat((zeros, token_type_ids), dim=1).long()
        return self.base_model(inputs_embeds=embeds, **extra)


def word_embeddings(model: torch.nn.Module) -> str | None:
    """The path of the module PEFT embeds ``input_ids`` with (``PeftModel._setup_prompt_encoder``):
    ``embeddings.word_embeddings`` if the model has it, else the module of the first parameter of the
    transformer backbone (the first child that is a transformers model, else the model) whose first
    dim is the config's vocabulary size; None when neither exists."""
    try:
        model.get_submodule("embeddings.word_embeddings")
        return "embeddings.word_embeddings"
    except AttributeError:
        pass
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    backbone, prefix = model, ""
    for name, child in model.named_children():
        if _is_transformers_model(child):
            backbone, prefix = child, f"{name}."
            break
    for name, value in backbone.named_parameters():
        if value.shape and value.shape[0] == vocab:
            return prefix + name.removesuffix(".weight")
    return None


def _is_transformers_model(module: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def signature(base: InputSignature, count: int, *, token_types: bool, tasks: int | None, where: str) -> InputSignature:
    """The wrapped model's inputs: the base's ``input_ids`` / ``attention_mask`` / ``token_type_ids``
    (the last only where PEFT keeps it), the sequence dim ``count`` shorter at most (the prompt takes
    those positions), and ``task_ids`` ``[batch]`` in ``[0, tasks)`` for multitask prompt tuning.

    Raises:
        UnsupportedError: the base takes no ``input_ids``, or an input the wrapper does not wire.
    """
    names = [i.name for i in base.inputs]
    if "input_ids" not in names:
        raise UnsupportedError(f"{where}: prompt learning prepends to input_ids' embeddings; the model takes {names}")
    other = [n for n in names if n not in INPUTS]
    if other:
        raise UnsupportedError(
            f"{where}: prompt learning wires {', '.join(INPUTS)}; the model's input {other[0]!r} is not supported"
        )
    inputs = [i for i in base.inputs if token_types or i.name != "token_type_ids"]
    ids = next(i for i in inputs if i.name == "input_ids")
    dims = dict(base.dims)
    seq = ids.shape[1] if len(ids.shape) == 2 else None
    if isinstance(seq, str) and dims[seq].max is not None:
        if dims[seq].max - count < max(dims[seq].min, 2):
            raise UnsupportedError(f"{where}: {count} virtual tokens leave no room in {seq} <= {dims[seq].max}")
        dims[seq] = dataclasses.replace(dims[seq], max=dims[seq].max - count)
    if tasks is not None:
        if "batch" not in dims:
            raise UnsupportedError(f"{where}: task_ids needs a 'batch' dim in the model's inputs")
        inputs.append(TensorInput(TASK_IDS, ("batch",), "int64", "index", 0, tasks))
    return InputSignature(tuple(inputs), dims)
