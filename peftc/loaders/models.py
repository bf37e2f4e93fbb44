"""Loading base models from what users name on the command line.

* a Hugging Face model directory (``config.json`` + safetensors): the class named by
  ``config.architectures`` (so a task head is kept), else ``AutoModel``; loaded offline;
* ``pkg.module:factory`` or ``path/to/file.py:factory``: a callable returning an ``nn.Module`` (or
  the module object itself);
* a ``.pt2`` file saved by ``torch.export.save`` (loaded without unpickling, see ``peftc.ir.serialize``).

Every model is put in eval mode with gradients off. Hugging Face models get ``use_cache=False``
(a KV cache is not a tensor output and cannot be exported).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from peftc import ir
from peftc.errors import InputError, UnsupportedError, first_line
from peftc.hashing import sha256_file
from peftc.loaders.inputs import InputSignature, from_program, from_transformers, parse_inputs


@dataclasses.dataclass
class LoadedModel:
    """A base model ready to trace (``module``) or already traced (``program``)."""

    spec: str
    kind: str
    """``huggingface``, ``factory``, ``exported`` or ``module`` (an object passed from Python)."""
    module: torch.nn.Module | None
    program: ir.Program | None
    signature: InputSignature | None
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    """sha256 of the files the model was read from."""

    @property
    def class_name(self) -> str:
        obj = self.module if self.module is not None else self.program
        return type(obj).__name__ if self.module is not None else "ExportedProgram"


def load_model(
    spec: Any, *, inputs: list[str] | tuple[str, ...] = (), allow_pickle: bool = False, workdir: str | None = None
) -> LoadedModel:
    """Load the base model named by ``spec`` (or wrap an ``nn.Module``/``ExportedProgram`` object).

    Args:
        spec: a path, ``pkg.module:factory``, an ``nn.Module`` or a ``torch.export.ExportedProgram``.
        inputs: ``--input`` texts overriding the derived input signature.
        allow_pickle: let ``.pt2`` files and HF ``pytorch_model.bin`` weights be unpickled.
        workdir: the directory ``pkg.module:factory`` modules are imported from, besides ``sys.path``
            (default: the working directory, as ``python -m`` does).

    Raises:
        InputError: the spec names nothing loadable (the message says what was tried).
    """
    override = parse_inputs(inputs) if inputs else None
    if isinstance(spec, torch.export.ExportedProgram):
        return LoadedModel("<ExportedProgram>", "exported", None, spec, override or from_program(spec))
    if isinstance(spec, torch.nn.Module):
        return _finish(LoadedModel(f"<{type(spec).__name__}>", "module", spec, None, None), override)
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return _finish(_load_huggingface(path, allow_pickle), override)
    if path.is_file() and path.suffix == ".pt2":
        program = ir.load_program(path, allow_pickle=allow_pickle)
        files = {path.name: sha256_file(path)}
        return LoadedModel(text, "exported", None, program, override or from_program(program), files)
    if ":" in text and not path.exists():
        return _finish(_load_factory(text, workdir or os.getcwd()), override)
    raise InputError(
        f"cannot load model {text!r}: expected a Hugging Face model directory, a .pt2 file, or pkg.module:factory"
    )


def _finish(model: LoadedModel, override: InputSignature | None) -> LoadedModel:
    module = model.module
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if hasattr(getattr(module, "config", None), "use_cache"):
        module.config.use_cache = False
    model.signature = override or from_transformers(module)
    if model.signature is None:
        raise InputError(
            f"cannot derive the inputs of {type(module).__name__}; describe them with "
            "--input name:dims:dtype (e.g. --input x:batch,16:float32)"
        )
    return model


def _load_huggingface(path: Path, allow_pickle: bool) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: not a Hugging Face model directory (no config.json)")
    import transformers

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(path.glob("pytorch_model*.bin"))
        if not pickled:
            raise InputError(f"{path}: no *.safetensors weights in the model directory")
        if not allow_pickle:
            raise InputError(
                f"{pickled[0]}: pickled weights are refused; convert them to safetensors "
                "or pass --allow-pickle (loads with weights_only=True)"
            )
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise InputError(f"{config_file}: {first_line(e)}") from e
    config.use_cache = False
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        module = cls.from_pretrained(str(path), config=config, local_files_only=True, use_safetensors=bool(weights))
    except Exception as e:
        raise InputError(f"{path}: cannot load {getattr(cls, '__name__', cls)}: {first_line(e)}") from e
    files = {f.name: sha256_file(f) for f in [config_file, *weights]}
    return LoadedModel(str(path), "huggingface", module, None, None, files)


def _load_factory(text: str, workdir: str) -> LoadedModel:
    target, _, attr = text.rpartition(":")
    if not target or not attr:
        raise InputError(f"model {text!r}: expected pkg.module:factory")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise InputError(f"model {text!r}: {file} does not exist")
            spec = importlib.util.spec_from_file_location(file.stem, file)
            module_obj = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module_obj)
        else:
            # Like `python -m`, resolve modules relative to the working directory too.
            if workdir not in sys.path:
                sys.path.insert(0, workdir)
            module_obj = importlib.import_module(target)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"model {text!r}: cannot import {target!r} ({type(e).__name__}: {first_line(e)})") from e
    factory = getattr(module_obj, attr, None)
    if factory is None:
        raise InputError(f"model {text!r}: {target!r} has no attribute {attr!r}")
    try:
        obj = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    except Exception as e:
        raise InputError(f"model {text!r}: the factory raised {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(obj, torch.nn.Module):
        raise UnsupportedError(f"model {text!r}: the factory returned {type(obj).__name__}, not a torch.nn.Module")
    return LoadedModel(text, "factory", obj, None, None)
