"""Tensors an adapter file names like the base model's own parameters (fine-tuned state dicts).

The official SSF and ZeroI2V code save the fine-tuned *model*: the adapter tensors plus every
parameter of the network, of which the frozen ones equal the base's and a few (the new task head,
anything else trained alongside) differ. Such a tensor is the value the fine-tuned model holds, so:

* equal to the base's value: recorded as unused ("identical to the base model"), no effect;
* different: a full replacement of that parameter (``replace-tensors`` applies it for every reader);
* another shape: an error naming the key and both shapes (e.g. a head trained for another number
  of classes: build the base with that head size);
* a name the base does not have (after the architecture's legacy renames): an error naming the key
  and the nearest parameter, since dropping a trained tensor silently would compile another model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Sequence

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods.base import AdapterSource, AdapterTensor, Replacement
from peftc.methods.common import nearest

Rename = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]
"""A legacy name and its current form (``re.sub`` replacement), tried when a name is not in the base."""


def base_tensor(
    source: AdapterSource,
    key: str,
    path: str,
    modules: ModuleTable,
    *,
    method: str,
    renames: Sequence[Rename] = (),
) -> tuple[Replacement | None, str]:
    """Classify the tensor at ``key`` (named ``path`` after prefix stripping); see the module docstring.

    Returns ``(replacement, "")`` or ``(None, why it has no effect)``.

    Raises:
        InputError: a name the base model lacks, or a shape that differs from the base's.
    """
    name = resolve_name(path, modules.state_shapes, renames)
    if name is None:
        raise InputError(
            f"{source.describe(key)}: neither an adapter tensor ({method}) nor a parameter of the base model "
            f"(looked for {path!r}){nearest(path, modules.state_shapes)}; give only the adapter tensors and tensors "
            "named as the base model names its parameters"
        )
    tensor = source.tensors[key]
    expected = modules.state_shapes[name]
    if tuple(tensor.shape) != tuple(expected):
        raise InputError(
            f"{source.describe(key)}: shape {list(tensor.shape)} does not match base parameter {name} "
            f"{list(expected)}; build the base model with the fine-tuned shapes (e.g. its number of classes)"
        )
    base = modules.tensors.get(name)
    if base is not None and base.dtype == tensor.dtype and torch.equal(base, tensor):
        return None, "identical to the base model's value"
    reason = f"fine-tuned value of {name} in the {method} state dict"
    return Replacement(name, AdapterTensor(key, tensor), reason, untie=False), ""


def resolve_name(path: str, names: Container[str], renames: Sequence[Rename] = ()) -> str | None:
    """``path`` if it is in ``names``, else the first legacy rename of it that is, else None."""
    if path in names:
        return path
    for pattern, replacement in renames:
        renamed = pattern.sub(replacement, path)
        if renamed != path and renamed in names:
            return renamed
    return None
