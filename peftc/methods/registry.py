"""Every method peftc knows, as one list of records, and the tables derived from it.

Adding a method is one module (its parser, site ops and record, ``METHOD``) and one line in
:data:`METHODS`. Passes and backends never name a method: they read the tables below — site ops by
name, parsers by ``peft_type``, each mode's extra passes — which follow the list.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.loaders.inputs import InputSignature
from peftc.methods import (
    adalora,
    adamss,
    beft,
    boft,
    bottleneck,
    c3a,
    compeft,
    deft,
    delora,
    delta,
    fourierft,
    frod,
    glora,
    gralora,
    hira,
    hra,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    miss,
    oft,
    onebit,
    osf,
    peanut,
    poly,
    prompt,
    psoft,
    pvera,
    randlora,
    refused,
    road,
    s2ft,
    shira,
    sparse,
    ssf,
    supertuning,
    tinylora,
    trainable_tokens,
    unilora,
    vblora,
    vera,
    waveft,
    xlora,
    zeroi2v,
)
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Inserted, Method
from peftc.ops import SiteOp
from peftc.passes.base import Pass
from peftc.precision import adapter_dtype, name_of
from peftc.swap.ops import SLOTS

METHODS: list[Method] = [
    lora.METHOD,
    adalora.METHOD,
    ia3.METHOD,
    ln_tuning.METHOD,
    trainable_tokens.METHOD,
    beft.METHOD,
    oft.METHOD,
    boft.METHOD,
    loha.METHOD,
    lokr.METHOD,
    vera.METHOD,
    ssf.METHOD,
    zeroi2v.METHOD,
    # One weight transform per module: block, reflection, sparse and spectral updates.
    miss.METHOD,
    hra.METHOD,
    shira.METHOD,
    fourierft.METHOD,
    c3a.METHOD,
    waveft.METHOD,
    # Updates built from shared or seeded projections, drawn again as PEFT draws them.
    randlora.METHOD,
    vblora.METHOD,
    unilora.METHOD,
    pvera.METHOD,
    tinylora.METHOD,
    # Updates whose frozen factors are rebuilt from the base weight, or that multiply it.
    osf.METHOD,
    psoft.METHOD,
    hira.METHOD,
    adamss.METHOD,
    deft.METHOD,
    # Normalised, rotated, block-wise and generalised low-rank updates.
    delora.METHOD,
    road.METHOD,
    gralora.METHOD,
    glora.METHOD,
    peanut.METHOD,
    supertuning.METHOD,
    frod.METHOD,
    delta.METHOD,
    # Quantized adapter storage (peftc's own formats): ternary task vectors, 1-bit low-rank factors.
    compeft.METHOD,
    onebit.METHOD,
    # Sparse updates (peftc's own formats): S²FT row/column blocks, sparse ΔW (scatter-add).
    s2ft.METHOD,
    sparse.METHOD,
    *prompt.METHODS,
    # Inserted before tracing: routed mixtures (task_ids input; X-LoRA's two passes), bottleneck adapters.
    poly.METHOD,
    xlora.METHOD,
    bottleneck.METHOD,
    SLOTS,
]
"""In the order their extra passes run. ``SLOTS`` is not an adapter format: swappable artifacts' ops."""

REFUSED_TYPES: dict[str, str] = {
    "LILY": refused.LILY,
    "SHADOW": refused.SHADOW,
}
"""PEFT types peftc knows and refuses, with the reason (no parser reads them)."""


def site_ops() -> dict[str, SiteOp]:
    """Every site op by name."""
    return _tables(tuple(METHODS))[0]


def parsers() -> dict[str, Method]:
    """The method that reads each ``peft_type``."""
    return _tables(tuple(METHODS))[1]


def passes(stage: Literal["merged", "unmerged"]) -> list[Pass]:
    """New instances of the passes methods add when sites are ``merged`` or stay ``unmerged``."""
    return [make() for method in METHODS for make in getattr(method, f"{stage}_passes")]


def recognise(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """The config a method reads from the key names of a weights file that came without one."""
    for method in METHODS:
        config = method.recognise(tensors) if method.recognise else None
        if config is not None:
            return config
    return None


@functools.cache
def _tables(methods: tuple[Method, ...]) -> tuple[dict[str, SiteOp], dict[str, Method]]:
    ops = {op.name: op for method in methods for op in method.ops}
    by_type = {peft_type: method for method in methods for peft_type in method.peft_types}
    return ops, by_type


def _inserted(methods: list[tuple[AdapterSource, Method | None]], task_id: int | None) -> list:
    fixed = task_id is not None
    return [(s, m) for s, m in methods if m and m.insert and not (fixed and m.fixed_task)]


def wraps_forward(sources: Sequence[AdapterSource], task_id: int | None = None) -> str | None:
    """The ``peft_type`` of the first adapter among ``sources`` that is inserted around the model's own
    forward (prompt learning, Poly, X-LoRA, bottleneck), else None: such a model is compiled as its plain
    forward, not as a generation step (``--task``)."""
    inserted = _inserted([(s, parsers().get(str(s.config.get("peft_type")))) for s in sources], task_id)
    return str(inserted[0][0].config.get("peft_type")) if inserted else None


def insertion(
    sources: Sequence[AdapterSource],
    module: torch.nn.Module | None,
    signature: InputSignature | None,
    task_id: int | None = None,
) -> Inserted | None:
    """How the adapters among ``sources`` that are inserted before tracing (``Method.insert``: prompt
    learning) wrap the base ``module``; None when there are none. With ``task_id``, methods routed by
    task (``Method.fixed_task``) are merged for it instead of inserted.

    Raises:
        UnsupportedError: such an adapter with others (it changes the program every other adapter's
            sites would be inserted into), or with an exported program for a base (nothing to wrap).
        InputError: ``task_id`` with no adapter routed by task.
    """
    methods = [(s, parsers().get(str(s.config.get("peft_type")))) for s in sources]
    if task_id is not None and not any(m and m.fixed_task for _, m in methods):
        raise InputError(
            f"--task-id {task_id}: no adapter is routed by task (POLY is); a CAUSAL_LM MULTITASK_PROMPT_TUNING "
            "prompt takes one with --task text-generation"
        )
    inserted = _inserted(methods, task_id)
    if not inserted:
        return None
    source, method = inserted[0]
    peft_type = source.config.get("peft_type")
    if len(sources) > 1:
        raise UnsupportedError(
            f"{source.config_path}: a {peft_type} adapter is inserted by wrapping the base model before it is "
            "traced; it cannot be stacked with other adapters (compile it alone)"
        )
    if module is None or signature is None:
        raise UnsupportedError(
            f"{source.config_path}: a {peft_type} adapter wraps the base model before it is traced; the base is "
            "an exported program (give the nn.Module)"
        )
    return method.insert(source, module, signature)


def parse_adapter(source: AdapterSource, modules: ModuleTable, options: ParseOptions | None = None) -> Adapter:
    """Interpret ``source`` with the parser of its ``peft_type``.

    Raises:
        UnsupportedError: a ``peft_type`` peftc refuses (with the reason), or one no method reads (the
            message lists those that are read).
    """
    peft_type = str(source.config.get("peft_type"))
    if peft_type in REFUSED_TYPES:
        raise UnsupportedError(f"{source.config_path}: peft_type {peft_type!r} is refused: {REFUSED_TYPES[peft_type]}")
    method = parsers().get(peft_type)
    if method is None or method.parse is None:
        raise UnsupportedError(
            f"{source.config_path}: peft_type {peft_type!r} is not supported; supported: "
            + ", ".join(repr(name) for name in sorted(parsers()))
        )
    return _computing(method.parse(source, modules, options or ParseOptions()), modules)


def _computing(adapter: Adapter, modules: ModuleTable) -> Adapter:
    """``adapter`` with every float site tensor in the dtype it computes in (``peftc.precision``, as PEFT
    loads it) and every index tensor in int64, after refusing integer tensors from the file (other than
    indices), float indices, and replacements of another kind than the parameter they replace
    (integer for float or the reverse).

    Raises:
        InputError: naming the key of such a tensor.
    """
    source = adapter.source

    def convert(site: Site) -> Site:
        module = modules.get(site.module)
        name = module.params.get(site.param or "weight") if module else None
        base = modules.tensors[name].dtype if name in modules.tensors else None
        tensors = {}
        for role, entry in site.tensors.items():
            if entry is not None and entry.index:
                if entry.tensor.is_floating_point() or entry.tensor.dtype == torch.bool:
                    raise InputError(
                        f"{source.describe(entry.key)}: dtype {name_of(entry.tensor.dtype)}; indices are integers"
                    )
                entry = dataclasses.replace(entry, tensor=entry.tensor.to(torch.int64))
            elif entry is not None and not entry.tensor.is_floating_point():
                if entry.key in source.tensors:
                    raise InputError(
                        f"{source.describe(entry.key)}: dtype {name_of(entry.tensor.dtype)}; adapter tensors are "
                        "floating point"
                    )
            elif entry is not None:
                entry = dataclasses.replace(entry, tensor=entry.tensor.to(adapter_dtype(base, entry.tensor.dtype)))
            tensors[role] = entry
        return dataclasses.replace(site, tensors=tensors, weight_form=tuple(convert(f) for f in site.weight_form))

    for replacement in adapter.replacements:
        base = modules.tensors.get(replacement.param)
        value = replacement.tensor.tensor
        if base is not None and value.is_floating_point() != base.is_floating_point():
            raise InputError(
                f"{source.describe(replacement.tensor.key)}: dtype {name_of(value.dtype)} for {replacement.param}, "
                f"which is {name_of(base.dtype)}"
            )
    return dataclasses.replace(adapter, sites=tuple(convert(s) for s in adapter.sites))
