"""The order in which PEFT walks a model's targets, for methods whose tensors depend on it.

Some PEFT methods hand out shared state by position: UniLoRA deals one seeded stream of indices to
its layers in turn, TinyLoRA seeds each layer's projections with its index and ties layers into groups
by it. PEFT takes that position from ``model.named_modules()``, the order the modules were declared.
The traced program keeps it in its signature: parameters are listed in ``named_parameters()`` order,
module by module in declaration order, so a target's place is that of its ``weight``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from peftc.errors import UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import peft_config


def declaration_order(modules: ModuleTable, paths: Iterable[str]) -> list[str]:
    """``paths`` (modules with a ``weight``) in the order PEFT meets them."""
    keys = {key: index for index, key in enumerate(modules.state_shapes)}
    return sorted(paths, key=lambda path: keys[modules[path].params["weight"]])


def untraced_targets(cfg: Mapping[str, Any], modules: ModuleTable) -> list[str]:
    """Modules with a weight that the config targets but that the traced program never calls (PEFT
    wraps them all the same, so they take their share of anything handed out in module order)."""
    owners = [key.removesuffix(".weight") for key in modules.state_shapes if key.endswith(".weight")]
    return [o for o in owners if (o not in modules or not modules[o].calls) and peft_config.is_target(cfg, o)]


def refuse_untraced(cfg: Mapping[str, Any], modules: ModuleTable, where: str, what: str) -> None:
    """Refuse an adapter whose PEFT module order includes targets the program does not run.

    Raises:
        UnsupportedError: naming the first such module and what depends on the order.
    """
    untraced = untraced_targets(cfg, modules)
    if untraced:
        raise UnsupportedError(
            f"{where}: module {untraced[0]!r} is targeted but does not run in the traced program; PEFT still "
            f"adapts it and {what}, which peftc cannot place without it"
        )
