"""Reading prompt-learning adapters (``PROMPT_TUNING``, ``P_TUNING``, ``MULTITASK_PROMPT_TUNING``,
``CPT``): what PEFT saves and how its ``task_type`` wires the prompt in.

**Adapter files.** ``prompt_embeddings`` ``[num_virtual_tokens, d]``: the prompt itself for prompt
tuning; the prompt encoder's output for P-tuning (PEFT evaluates its MLP/LSTM when it saves and uses
the saved rows as they are when it loads); the trained prompt plus its projected delta for CPT.
Multitask prompt tuning adds ``prefix_task_cols`` ``[tasks, n, r]`` and ``prefix_task_rows``
``[tasks, r, d]``. ``base_model.<module>.<param>`` keys are ``modules_to_save`` copies (PEFT adds the
classification head for ``SEQ_CLS``): full replacements.

**Task types.** PEFT picks the model class by ``task_type``: ``SEQ_CLS``, ``TOKEN_CLS`` and
``QUESTION_ANS`` keep ``token_type_ids`` (extended with zeros), ``FEATURE_EXTRACTION`` and
``CAUSAL_LM`` drop them; ``task_ids`` reach the prompt for ``SEQ_CLS``, ``TOKEN_CLS`` and
``CAUSAL_LM`` only. Without a task type PEFT's plain ``PeftModel`` ignores the prompt, and
``SEQ_2_SEQ_LM`` prompts the decoder too: both are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.loaders.inputs import InputSignature
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Replacement
from peftc.methods.prompt import wrapper
from peftc.methods.record import Inserted

TOKEN_TYPES = {
    "SEQ_CLS": True,
    "TOKEN_CLS": True,
    "QUESTION_ANS": True,
    "FEATURE_EXTRACTION": False,
    "CAUSAL_LM": False,
}
"""Task types peftc inserts, and whether PEFT keeps ``token_type_ids`` for them."""
TASK_IDS = ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM")
"""Task types whose PEFT model passes ``task_ids`` to the prompt (multitask prompt tuning needs them)."""
PROMPT = "prompt_embeddings"
TASK_KEYS = ("prefix_task_cols", "prefix_task_rows")
SAVED = "base_model."
"""The prefix of ``modules_to_save`` copies in a prompt-learning checkpoint (the wrapper's base)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt-learning adapter as PEFT runs it."""

    task: str
    prompt: AdapterTensor
    tasks: tuple[AdapterTensor, AdapterTensor] | None
    """Multitask prompt tuning's ``(prefix_task_cols, prefix_task_rows)``."""
    saved: tuple[str, ...]
    """Keys of ``modules_to_save`` copies."""

    @property
    def count(self) -> int:
        return int(self.prompt.tensor.shape[0])


def read(source: AdapterSource, tasks: Mapping[str, bool] = TOKEN_TYPES, width: int | None = None) -> Prompt:
    """The prompt, the task tensors and the copies of ``source``, checked against its config.

    ``tasks``: the task types the method is inserted for; ``width``: the prompt's row width where the
    config fixes it otherwise (prefix tuning's ``2·num_layers·token_dim``; default ``token_dim``).

    Raises:
        UnsupportedError: a task type PEFT does not prompt, or prompts otherwise (see the module
            docstring); several transformer submodules; multitask prompts for a task PEFT gives no ids.
        InputError: a missing or misshapen tensor, or a key that is none of the above (naming it).
    """
    cfg, where, peft_type = source.config, source.config_path, source.config.get("peft_type")
    task = cfg.get("task_type")
    if task not in tasks:
        why = (
            "PEFT's plain PeftModel ignores the prompt without a task type"
            if task is None
            else "encoder-decoder prompts (the decoder's too) are not supported"
            if task == "SEQ_2_SEQ_LM"
            else "not a task type peftc inserts it for"
        )
        raise UnsupportedError(f"{where}: {peft_type} with task_type={task!r}: {why}; use one of {sorted(tasks)}")
    if cfg.get("num_transformer_submodules") not in (None, 1):
        raise UnsupportedError(
            f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']!r}: one prompt per model is supported"
        )
    count = cfg.get("num_virtual_tokens")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"{where}: num_virtual_tokens={count!r}; give a positive integer")
    if PROMPT not in source.tensors:
        raise InputError(f"{source.weights_path}: no {PROMPT!r} tensor (keys: {sorted(source.tensors)[:5]})")
    prompt = AdapterTensor(PROMPT, source.tensors[PROMPT])
    what = "2·num_layers·token_dim" if width else "token_dim"
    width = width or cfg.get("token_dim") or prompt.tensor.shape[-1]
    common.expect_shape(source, prompt, (count, width), f"[num_virtual_tokens={count}, {what}={width}]")
    tasks = _tasks(source, count, width, task) if peft_type == "MULTITASK_PROMPT_TUNING" else None
    known = {PROMPT, *(TASK_KEYS if tasks else ())}
    other = sorted(k for k in source.tensors if k not in known and not k.startswith(SAVED))
    if other:
        raise InputError(
            f"{source.describe(other[0])}: not a {peft_type} tensor ({', '.join(sorted(known))}) or a copy"
        )
    return Prompt(task, prompt, tasks, tuple(sorted(k for k in source.tensors if k.startswith(SAVED))))


def _tasks(source: AdapterSource, count: int, width: int, task: str) -> tuple[AdapterTensor, AdapterTensor]:
    where = source.config_path
    if task not in TASK_IDS:
        raise UnsupportedError(
            f"{where}: MULTITASK_PROMPT_TUNING with task_type={task!r}: PEFT's model for it passes no task_ids to "
            f"the prompt (it fails); use one of {list(TASK_IDS)}"
        )
    missing = [k for k in TASK_KEYS if k not in source.tensors]
    if missing:
        raise InputError(f"{source.weights_path}: no {missing[0]!r} tensor")
    cols, rows = (AdapterTensor(k, source.tensors[k]) for k in TASK_KEYS)
    tasks, ranks = cfg_int(source, "num_tasks"), cfg_int(source, "num_ranks")
    common.expect_shape(source, cols, (tasks, count, ranks), f"[num_tasks={tasks}, {count}, num_ranks={ranks}]")
    common.expect_shape(source, rows, (tasks, ranks, width), f"[num_tasks={tasks}, num_ranks={ranks}, {width}]")
    return cols, rows


def cfg_int(source: AdapterSource, name: str, default: int | None = 1) -> int:
    """The config field ``name`` (``default`` when absent, as PEFT's config defaults it).

    Raises:
        InputError: it is not a positive integer.
    """
    value = source.config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{source.config_path}: {name}={value!r}; give a positive integer")
    return value


def insert(source: AdapterSource, module: torch.nn.Module, base: InputSignature) -> Inserted:
    """The wrapper ``module`` is traced in, and its inputs (``peftc/methods/prompt/wrapper.py``).

    Raises:
        UnsupportedError: no word embedding PEFT would find, a width other than the prompt's, or
            inputs the wrapper cannot wire.
    """
    spec = read(source)
    where = str(source.config_path)
    path = embedding_path(source, module, spec.prompt.tensor.shape[1])
    token_types = TOKEN_TYPES[spec.task]
    tasks = (spec.tasks[0].tensor, spec.tasks[1].tensor) if spec.tasks else None
    signature = wrapper.signature(
        base, spec.count, token_types=token_types, tasks=tasks[0].shape[0] if tasks else None, where=where
    )

    def wrap(traced: torch.nn.Module) -> torch.nn.Module:
        return wrapper.Prompted(traced, path, spec.prompt.tensor, token_types=token_types, tasks=tasks)

    return Inserted(wrap, signature)


def embedding_path(source: AdapterSource, module: torch.nn.Module, width: int) -> str:
    """The path of the word embedding PEFT prepends the prompt's ``width``-wide rows to in ``module``.

    Raises:
        UnsupportedError: PEFT finds none (:func:`wrapper.word_embeddings`), or its width is not ``width``.
    """
    where = str(source.config_path)
    path = wrapper.word_embeddings(module)
    if path is None:
        raise UnsupportedError(
            f"{where}: PEFT finds no word embedding in {type(module).__name__} (embeddings.word_embeddings, or a "
            "parameter of the config's vocab_size rows); prompt learning needs a transformers text model"
        )
    weight = getattr(module.get_submodule(path), "weight", None)
    if weight is None or weight.dim() != 2 or weight.shape[1] != width:
        shape = list(weight.shape) if weight is not None else None
        raise UnsupportedError(f"{where}: prompt width {width} does not fit the word embedding {path} {shape}")
    return path


def parser(method: str, fields: common.Fields, reader: Callable[[AdapterSource], Prompt] = read) -> Any:
    """The parse function of one prompt-learning ``Method`` record (``reader``: its :func:`read`)."""

    def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
        """The adapter, found in the program its wrapper was traced in: no sites; ``modules_to_save``
        copies as replacements.

        Raises:
            UnsupportedError: the program was not traced with the adapter's wrapper (adding a prompt to
                a compiled artifact), or a config field peftc refuses.
            InputError: see :func:`read`; a copy of a parameter the base lacks or of another shape.
        """
        peft_type = str(source.config.get("peft_type"))
        honoured, ignored = common.classify_fields(source, peft_type, fields)
        ignored.pop("task_type", None)  # it selects the wiring here (PEFT's model class)
        spec = reader(source)
        traced = modules.tensors.get(PROMPT)
        if traced is None or not torch.equal(traced.float(), spec.prompt.tensor.float()):
            raise UnsupportedError(
                f"{source.config_path}: a {peft_type} adapter is inserted when peftc traces the model (compile with "
                "it alone); it cannot be added to a program traced without it"
            )
        replacements = [_copy(source, key, modules) for key in spec.saved]
        honoured["inserted"] = f"{spec.count} virtual tokens ({method})"
        return Adapter(source.name, method, source, (), tuple(replacements), (), honoured, ignored)

    return parse


def _copy(source: AdapterSource, key: str, modules: ModuleTable) -> Replacement:
    expected: Mapping[str, Any] = modules.state_shapes
    tensor = AdapterTensor(key, source.tensors[key])
    if key not in expected:
        raise InputError(
            f"{source.describe(key)}: a modules_to_save copy of a parameter the model lacks{common.nearest(key, expected)}"
        )
    common.expect_shape(source, tensor, tuple(expected[key]), f"{list(expected[key])} ({key})")
    return Replacement(key, tensor, "modules_to_save copy", untie=True)
