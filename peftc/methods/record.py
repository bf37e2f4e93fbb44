"""One record per method: what the compiler needs to know about it, declared in the method's module.

A :class:`Method` names the ``peft_type`` values its parser reads, its site ops (each carrying its
eager body, ONNX translation and weight form, ``peftc/ops.py``) and the passes it adds to a build
mode. A method that changes the model's inputs rather than its modules (prompt learning) instead
names how it is *inserted*: a wrapper around the base module, traced in its place (:class:`Inserted`). ``peftc/methods/registry.py`` lists every record; the tables the passes and backends use
(site ops by name, parsers by ``peft_type``, translations) are derived from that list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from peftc.ir.modules import ModuleTable
    from peftc.loaders.inputs import InputSignature
    from peftc.methods.base import Adapter, AdapterSource, ParseOptions
    from peftc.methods.common import Fields
    from peftc.ops import SiteOp
    from peftc.passes.base import Pass

Parser = Callable[["AdapterSource", "ModuleTable", "ParseOptions"], "Adapter"]
"""Interprets an adapter read from disk against the base model's modules."""
Recognise = Callable[[Mapping[str, "torch.Tensor"]], "dict[str, Any] | None"]
"""The config implied by the key names of a weights file given without one, or None."""


@dataclasses.dataclass(frozen=True)
class Inserted:
    """How an adapter that changes the model's inputs enters the program: the base module is traced
    inside :attr:`wrap`, which takes the inputs :attr:`signature` describes."""

    wrap: Callable[[torch.nn.Module], torch.nn.Module]
    """The module traced in place of the base, given the base in the precision being traced."""
    signature: InputSignature
    """The wrapped module's inputs (the base's, less those the method ignores, plus its own)."""


Insert = Callable[["AdapterSource", "torch.nn.Module", "InputSignature"], Inserted]
"""Builds :class:`Inserted` from an adapter read from disk and the untraced base module and its inputs."""


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything peftc knows about one adapter method."""

    name: str
    """Short name (``lora``, ``ssf``…)."""
    peft_types: tuple[str, ...]
    """The ``peft_type`` values of ``adapter_config.json`` its parser reads (none: not an adapter format)."""
    parse: Parser | None
    ops: tuple[SiteOp, ...] = ()
    """The ``peftc::`` site ops its sites use (registered when the module is imported)."""
    merged_passes: tuple[Callable[[], Pass], ...] = ()
    """Passes run after ``merge`` when adapters are merged: folds of its activation sites."""
    unmerged_passes: tuple[Callable[[], Pass], ...] = ()
    """Passes run when sites stay unmerged: weight-only work moved to compile time."""
    recognise: Recognise | None = None
    """Reads a weights file that comes without a config (an official checkpoint format)."""
    fields: Fields | None = dataclasses.field(default=None, compare=False)
    """The config fields its parser honours, ignores and refuses (what ``peftc methods`` lists; not part
    of the record's hash: the registry's tables are cached by record)."""
    insert: Insert | None = None
    """Methods inserted before tracing (prompt learning): the parser then finds the adapter's tensors
    in the traced program and returns no sites."""
    fixed_task: bool = False
    """An inserted method whose mix depends only on a task id (Poly): given one (``--task-id``,
    ``ParseOptions.task_id``) it is not inserted, and its parser returns weight sites for that task."""
