"""Adapter formats: read an adapter from disk and interpret it against the base model.

``PARSERS`` maps a PEFT ``peft_type`` to the parser that understands it (plus ``SSF`` and
``ZEROI2V``, which PEFT lacks); every other type is an :class:`~peftc.errors.UnsupportedError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peftc.errors import UnsupportedError, one_of
from peftc.ir.modules import ModuleTable
from peftc.methods import (
    adalora,
    beft,
    boft,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    oft,
    ssf,
    trainable_tokens,
    vera,
    zeroi2v,
)
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Replacement, Site
from peftc.methods.loading import read_adapter

Parser = Callable[[AdapterSource, ModuleTable, ParseOptions], Adapter]

PARSERS: dict[str, Parser] = {
    "LORA": lora.parse,
    "IA3": ia3.parse,
    "ADALORA": adalora.parse,
    "LN_TUNING": ln_tuning.parse,
    "TRAINABLE_TOKENS": trainable_tokens.parse,
    "BEFT": beft.parse,
    "OFT": oft.parse,
    "BOFT": boft.parse,
    "LOHA": loha.parse,
    "LOKR": lokr.parse,
    "VERA": vera.parse,
    # Not PEFT methods: formats of their official code and peftc-native directories.
    "SSF": ssf.parse,
    "ZEROI2V": zeroi2v.parse,
}


def parse_adapter(source: AdapterSource, modules: ModuleTable, options: ParseOptions | None = None) -> Adapter:
    """Interpret ``source`` with the parser for its ``peft_type``."""
    peft_type = str(source.config.get("peft_type"))
    parser = PARSERS.get(peft_type)
    if parser is None:
        raise UnsupportedError(
            f"{source.config_path}: peft_type {peft_type!r} is not supported; supported: {one_of(sorted(PARSERS))}"
        )
    return parser(source, modules, options or ParseOptions())


def load_adapter(
    path: str | Path,
    modules: ModuleTable,
    *,
    name: str | None = None,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    options: ParseOptions | None = None,
) -> Adapter:
    """Read and interpret an adapter in one step."""
    return parse_adapter(read_adapter(path, name=name, config=config, allow_pickle=allow_pickle), modules, options)


__all__ = [
    "PARSERS",
    "Adapter",
    "AdapterSource",
    "AdapterTensor",
    "ParseOptions",
    "Replacement",
    "Site",
    "load_adapter",
    "parse_adapter",
    "read_adapter",
]
