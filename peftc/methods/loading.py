"""Reading adapters from disk: a PEFT directory, or a ``.safetensors`` file plus its config.

:func:`read_adapter` reads the files; :func:`load_adapter` also interprets them against a model
(``peftc.methods.registry.parse_adapter``).

Only safetensors are read by default. A pickled ``adapter_model.bin`` is refused with the reason;
``allow_pickle=True`` loads it with ``torch.load(weights_only=True)``, which restricts unpickling to
tensors and plain containers. A weights file with no config beside it is accepted when its key names
say what it is: an official SSF checkpoint (``ssf_scale_N`` keys; ``Method.recognise``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from peftc import reading
from peftc.errors import InputError, first_line
from peftc.ir.modules import ModuleTable
from peftc.loaders.hub import cached, is_hub_id
from peftc.methods import peft_config, registry
from peftc.methods.base import Adapter, AdapterSource, ParseOptions

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def read_adapter(
    path: str | Path,
    *,
    name: str | None = None,
    config: str | Path | None = None,
    allow_pickle: bool = False,
) -> AdapterSource:
    """Read an adapter's config and tensors.

    Args:
        path: a PEFT adapter directory, or a weights file (``.safetensors``; ``.bin`` with
            ``allow_pickle``).
        name: the adapter's name in the program (:data:`NAME_RULE`; refused otherwise); defaults to the
            directory (or file) name with other characters replaced by ``_``, cut to 64 characters.
        config: an ``adapter_config.json`` to use instead of the one in the directory / beside the file.
        allow_pickle: accept a pickled weights file, loaded with ``weights_only=True``.

    Raises:
        InputError: naming the missing, unreadable or malformed file.
    """
    hub_name = None
    if is_hub_id(str(path)):
        hub_name = str(path).rsplit("/", 1)[1]  # the snapshot directory is named after a commit
        path = cached(str(path), "adapter")
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: adapter path does not exist")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            pickled = [path / n for n in PICKLE_NAMES if (path / n).exists()]
            if not pickled:
                raise InputError(f"{path}: no {WEIGHTS_NAME} in the adapter directory")
            weights = pickled[0]
        config_path = Path(config) if config else path / CONFIG_NAME
        default_name = path.resolve().name
    else:
        weights = path
        config_path = Path(config) if config else path.parent / CONFIG_NAME
        default_name = path.stem if path.stem != "adapter_model" else path.resolve().parent.name
    chosen = adapter_name(name) if name is not None else _default_name(hub_name or default_name)
    own_config = config is None and not config_path.exists()
    if not path.is_dir() and (own_config or (config is not None and config_path.resolve() == weights.resolve())):
        return _self_described(path, weights, chosen, allow_pickle)
    if not config_path.exists():
        hint = "" if path.is_dir() else " (a bare weights file needs --config adapter_config.json)"
        raise InputError(f"{config_path}: missing adapter config{hint}")

    cfg, raw = reading.read_json(config_path)
    if not isinstance(cfg, dict):
        raise InputError(f"{config_path}: expected a JSON object, got {type(cfg).__name__}")
    if "peft_type" not in cfg:
        raise InputError(f"{config_path}: no 'peft_type' field; is this a PEFT adapter config?")
    peft_config.check_selectors(cfg, config_path)

    # AdaLoRA prunes a module's rank to 0 and saves its factors with zero rows: the one format where
    # zero-size tensors mean something (that module adds nothing).
    tensors, digest = _load_tensors(weights, allow_pickle, empty=cfg.get("peft_type") == "ADALORA")
    return AdapterSource(
        name=chosen,
        path=path,
        config_path=config_path,
        weights_path=weights,
        config=cfg,
        tensors=tensors,
        sha256={
            "config": hashlib.sha256(raw).hexdigest(),
            "weights": digest,
        },
    )


def _self_described(path: Path, weights: Path, name: str, allow_pickle: bool) -> AdapterSource:
    """A weights file without a config whose key names say what it is (``Method.recognise``: an
    official SSF checkpoint).

    The file stands for its config too (``config_path`` is the weights file), so a rebuild from the
    manifest reads it the same way.
    """
    tensors, digest = _load_tensors(weights, allow_pickle)
    cfg = registry.recognise(tensors)
    if cfg is None:
        raise InputError(
            f"{weights.parent / CONFIG_NAME}: missing adapter config (a bare weights file needs --config "
            "adapter_config.json, unless it is an official SSF checkpoint with ssf_scale_N keys)"
        )
    return AdapterSource(
        name=name,
        path=path,
        config_path=weights,
        weights_path=weights,
        config=cfg,
        tensors=tensors,
        sha256={"config": digest, "weights": digest},
    )


def _load_tensors(path: Path, allow_pickle: bool, empty: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, sha256 of the bytes they were read from)``, each tensor finite and, unless ``empty``
    allows it, non-empty."""
    if path.suffix == ".safetensors":
        tensors, digest = reading.read_safetensors(path)
        if not tensors:
            raise InputError(f"{path}: the safetensors file holds no tensors")
    elif path.suffix in (".bin", ".pt", ".pth"):
        if not allow_pickle:
            raise InputError(
                f"{path}: pickled weights are refused because unpickling can run arbitrary code; "
                "convert the adapter to safetensors (PEFT: save_pretrained(..., safe_serialization=True)) "
                "or pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        import io

        data = reading.read_bytes(path)
        try:
            loaded: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{path}: cannot load with weights_only=True ({first_line(e)})") from e
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise InputError(f"{path}: expected a dict of tensors")
        tensors, digest = dict(loaded), hashlib.sha256(data).hexdigest()
    else:
        raise InputError(f"{path}: unknown adapter weights format {path.suffix!r} (expected .safetensors)")
    zero = None if empty else next((k for k, t in tensors.items() if t.numel() == 0), None)
    if zero is not None:
        raise InputError(f"{path.name}:{zero}: zero-size tensor (shape {list(tensors[zero].shape)})")
    reading.check_finite(tensors, path.name)
    return tensors, digest


NAME_RULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""Adapter names: 1 to 64 ASCII letters, digits and ``_``, not starting with a digit (they name
tensors in the program and files in the artifact)."""


def adapter_name(name: str) -> str:
    """``name`` if it is a valid adapter name (:data:`NAME_RULE`).

    Raises:
        InputError: naming the rule.
    """
    if not isinstance(name, str) or NAME_RULE.fullmatch(name) is None:
        shown = repr(name) if len(str(name)) <= 80 else f"{str(name)[:60]!r}… ({len(name)} characters)"
        raise InputError(
            f"adapter name {shown} is not allowed: use 1 to 64 ASCII letters, digits and '_', "
            "not starting with a digit (--name)"
        )
    return name


def _default_name(stem: str) -> str:
    """The name of an adapter given without one: its directory or file name, other characters replaced
    by ``_``, cut to 64 characters."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", stem).strip("_") or "adapter"
    return (ident if not ident[0].isdigit() else f"a_{ident}")[:64]


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
    source = read_adapter(path, name=name, config=config, allow_pickle=allow_pickle)
    return registry.parse_adapter(source, modules, options)
