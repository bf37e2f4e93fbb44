"""MLP blocks of an eager model: where the activation is, which projections feed it, which reads it.

A *neuron* is one feature of the activation's output. The projections that produce it (``ups``: up, and
gate in a gated MLP) hold it as an output row; the down projection holds it as an input column. Known
layouts, found by the attributes of a parent module:

* BERT/RoBERTa: ``P.intermediate.dense`` → ``P.intermediate.intermediate_act_fn`` → ``P.output.dense``;
* T5: ``P.wi`` (or gated ``P.wi_0`` · ``P.wi_1``) → ``P.act`` → ``P.wo``;
* LLaMA-style gated: ``act_fn(P.gate_proj(x)) · P.up_proj(x)`` → ``P.down_proj``.

In a gated MLP the activation is applied to the gate only; a gate activation that is exactly 0 makes
the neuron's product 0, so density and dead neurons are read from the activation in every layout.
"""

from __future__ import annotations

import dataclasses

import torch

from peftc.errors import UnsupportedError

EXACT_ZERO = ("ReLU", "ReLU6", "ReLUSquaredActivation")
"""Activation classes whose inactive outputs are exact zeros (others are smooth: GELU, SiLU…)."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One MLP block, by module path."""

    activation: str
    ups: tuple[str, ...]
    down: str
    kind: str
    """The activation module's class name."""

    @property
    def exact_zeros(self) -> bool:
        """Whether inactive neurons output exact zeros (ReLU), so removing them is exact."""
        return self.kind in EXACT_ZERO


def _layout(path: str, module: torch.nn.Module) -> Block | None:
    def name(*parts: str) -> str:
        return ".".join(p for p in (path, *parts) if p)

    def has(*names: str) -> bool:
        return all(_exists(module, n) for n in names)

    if has("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"):
        act = module.get_submodule("intermediate.intermediate_act_fn")
        return Block(name("intermediate.intermediate_act_fn"), (name("intermediate.dense"),), name("output.dense"),
                     type(act).__name__)  # fmt: skip
    if has("act", "wo") and (has("wi") or has("wi_0", "wi_1")):
        ups = ("wi",) if has("wi") else ("wi_0", "wi_1")
        return Block(name("act"), tuple(name(u) for u in ups), name("wo"), type(module.act).__name__)
    if has("gate_proj", "up_proj", "down_proj", "act_fn"):
        ups = (name("gate_proj"), name("up_proj"))
        return Block(name("act_fn"), ups, name("down_proj"), type(module.act_fn).__name__)
    return None


def _exists(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_blocks(model: torch.nn.Module) -> list[Block]:
    """The MLP blocks of ``model`` in module order.

    Raises:
        UnsupportedError: none of the known layouts occurs in the model.
    """
    blocks = [b for path, module in model.named_modules() if (b := _layout(path, module)) is not None]
    if not blocks:
        raise UnsupportedError(
            f"{type(model).__name__}: no MLP block peftc knows (BERT intermediate/output, T5 wi/act/wo, "
            "gate_proj/up_proj/act_fn/down_proj); activation density needs an activation module between them"
        )
    return blocks


def linear(model: torch.nn.Module, path: str) -> torch.nn.Linear:
    """The ``nn.Linear`` at ``path``.

    Raises:
        UnsupportedError: it is another kind of module (a PEFT layer not merged, a quantized layer).
    """
    module = model.get_submodule(path)
    if type(module) is not torch.nn.Linear:
        raise UnsupportedError(f"{path} is a {type(module).__name__}; rewriting an MLP needs plain nn.Linear layers")
    return module


def replace(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Put ``new`` at ``path`` inside ``model``."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
