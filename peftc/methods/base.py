"""Typed adapter records shared by every method parser.

A parser turns an adapter on disk (:class:`AdapterSource`: config + tensors) and the base model's
module table into an :class:`Adapter`: the sites it adapts, the base tensors it replaces outright,
and an account of every config field and every tensor key. Nothing in a file is silently dropped:
a key is a site tensor, a replacement, or listed in ``unused`` with the reason it has no effect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

UNKNOWN_UNSET = "not known to peftc, but unset, so it cannot change what the adapter computes"
"""How a config field peftc does not know is recorded when its value is unset (None, false, empty)."""


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """An adapter as read from disk, before interpretation."""

    name: str
    path: Path
    config_path: Path
    weights_path: Path
    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    sha256: Mapping[str, str]

    def describe(self, key: str) -> str:
        """``file:key`` for error messages and provenance."""
        return f"{self.weights_path.name}:{key}"


@dataclasses.dataclass(frozen=True)
class ParseOptions:
    """How the user asked for adapters to be read."""

    base_residual: bool = False
    """The base model is the residual base a PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapter was trained on."""
    task_id: int | None = None
    """The task a routed adapter (Poly) is compiled for: its mix is then fixed and merged (``--task-id``)."""
    tied_embeddings: bool | None = None
    """Whether the model declares its output layer tied to the input embedding (transformers
    ``tie_word_embeddings``); None when unknown (an exported program). PEFT carries trainable token
    rows into a tied output layer only when the model declares the tie."""


@dataclasses.dataclass(frozen=True)
class AdapterTensor:
    """A tensor of the adapter file and the key it came from."""

    key: str
    tensor: torch.Tensor
    shared: bool = False
    """One tensor of the whole adapter that every site reads (VeRA's projections): inserted once, as
    ``<role>.<adapter>``, rather than once per module."""
    index: bool = False
    """An integer tensor of positions into another adapter tensor (UniLoRA's indices into its shared
    vector): kept as int64, never cast to the compute dtype."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted module (or one of its parameters) and the site op that adapts it.

    A *call site* (``param`` None) replaces each call of the module; a *weight site* replaces the
    module's parameter ``param`` by ``op(param, *tensors, *scalars)``; an *activation site*
    (``position`` set) transforms the activation at the module call's output or input (see
    ``peftc/ops.py``).
    """

    module: str
    op: str
    tensors: Mapping[str, AdapterTensor | None]
    scalars: Mapping[str, Any]
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Human-facing facts for the manifest (module type, rank, alpha...)."""
    param: str | None = None
    """Weight sites: the module's parameter they transform (``weight``, ``bias``...)."""
    weight_form: tuple[Site, ...] = ()
    """Call sites: the equivalent weight sites, used when adapters are stacked on one module."""
    position: str | None = None
    """Activation sites: ``"output"`` (after the module's output) or ``"input"`` (before its input)."""


@dataclasses.dataclass(frozen=True)
class Replacement:
    """A base parameter the adapter replaces by a full tensor (``modules_to_save``, trained biases)."""

    param: str
    tensor: AdapterTensor
    reason: str
    untie: bool = True
    """The replaced module gets its own copy and other readers of a shared (tied) tensor keep the base
    value, as for PEFT's ``modules_to_save`` copies; False replaces the shared tensor for every reader,
    as PEFT's in-place loading of saved embedding layers and trained biases does."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """An interpreted adapter, ready for the insertion passes."""

    name: str
    method: str
    source: AdapterSource
    sites: tuple[Site, ...]
    replacements: tuple[Replacement, ...] = ()
    unused: tuple[tuple[str, str], ...] = ()
    """``(key, reason)`` for tensors that have no effect on inference (PEFT ignores them too)."""
    honoured: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Config fields that change the math, with the values used."""
    ignored: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Config fields that do not affect inference, with the reason."""
    warnings: tuple[str, ...] = ()
    oracle_config: Mapping[str, Any] | None = None
    """The config PEFT's oracle should load instead of the file's, where they must differ (a residual
    base given with ``--base-residual`` must not be rebuilt again by PEFT's initialisation)."""
    oracle_inputs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Inputs PEFT's model needs that the compiled program fixes, each given to it as that value per
    batch row (``task_ids`` of a Poly adapter compiled for one task)."""

    def all_warnings(self) -> list[str]:
        """The parser's warnings plus one per config field peftc does not know (unset, so harmless)."""
        unknown = [
            f"adapter {self.name!r}: config field {k!r} is {why}"
            for k, why in self.ignored.items()
            if why == UNKNOWN_UNSET
        ]
        return [*self.warnings, *unknown]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for the manifest."""
        return {
            "name": self.name,
            "method": self.method,
            "peft_type": self.source.config.get("peft_type"),
            "path": str(self.source.path.resolve()),
            "config_file": str(self.source.config_path.resolve()),
            "weights_file": str(self.source.weights_path.resolve()),
            "sha256": dict(self.source.sha256),
            "base_model": self.source.config.get("base_model_name_or_path"),
            "config_honoured": _jsonable(self.honoured),
            "config_ignored": dict(self.ignored),
            "sites": [
                {
                    "module": s.module,
                    **({"param": s.param} if s.param else {}),
                    **({"position": s.position} if s.position else {}),
                    "op": f"peftc::{s.op}",
                    **_jsonable(s.info),
                    "scalars": _jsonable(s.scalars),
                    "tensors": {r: (t.key if t else None) for r, t in s.tensors.items()},
                }
                for s in self.sites
            ],
            "replacements": [{"param": r.param, "key": r.tensor.key, "reason": r.reason} for r in self.replacements],
            "unused_keys": [{"key": k, "reason": why} for k, why in self.unused],
            "warnings": self.all_warnings(),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
