"""Loading base models from what users name on the command line.

* a Hugging Face model directory (``config.json`` + safetensors): the class named by
  ``config.architectures`` (so a task head is kept), else ``AutoModel``; loaded offline;
* ``pkg.module:factory`` or ``path/to/file.py:factory``: a callable returning an ``nn.Module`` (or
  the module object itself);
* a ``.pt2`` file saved by ``torch.export.save`` (loaded without unpickling, see ``peftc.ir.serialize``);
* ``timm:NAME[,KEY=VALUE...]@WEIGHTS``: ``timm.create_model(NAME, pretrained=False, KEY=VALUE...)`` with
  its state dict read from the local file ``WEIGHTS`` (safetensors; a pickle only with
  ``allow_pickle``, through ``torch.load(weights_only=True)``), since there is no model hub. Values are
  JSON (``depth=2``, ``depths=[2,2]``, ``global_pool="avg"``; a bare word is a string); commas inside
  brackets do not split. The input is ``x:batch,C,H,W`` from the model's ``pretrained_cfg`` input
  size, or its patch embedding's image size (``img_size=...``). timm is an optional dependency
  (``peftc[timm]``) imported only here, and it imports torchvision, which must match the installed torch.

Every model is put in eval mode with gradients off. Hugging Face models get ``use_cache=False``
(a KV cache is not a tensor output and cannot be exported).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from peftc import ir, reading
from peftc.errors import InputError, PeftcError, UnsupportedError, first_line
from peftc.hashing import sha256_file
from peftc.loaders import causal, seq2seq, vision
from peftc.loaders.hub import cached, is_hub_id
from peftc.loaders.inputs import InputSignature, from_program, from_timm, from_transformers, parse_inputs
from peftc.loaders.timm_models import TIMM_PREFIX, load_timm


@dataclasses.dataclass
class LoadedModel:
    """A base model ready to trace (``module``) or already traced (``program``)."""

    spec: str
    kind: str
    """``huggingface``, ``factory``, ``timm``, ``exported`` or ``module`` (an object passed from Python)."""
    module: torch.nn.Module | None
    program: ir.Program | None
    signature: InputSignature | None
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    """sha256 of the files the model was read from."""
    task: str | None = None
    """``text-generation``: one generation step with explicit KV caches (``peftc/loaders/causal.py``)."""
    image_size: str | None = None
    """A vision model's image size: ``dynamic: ...`` or ``fixed HxW: why`` (the manifest's ``model.image_size``)."""

    @property
    def class_name(self) -> str:
        obj = self.module if self.module is not None else self.program
        return type(obj).__name__ if self.module is not None else "ExportedProgram"

    @property
    def precision(self) -> str:
        """The precision of the base checkpoint: the dtype holding most of its float parameters."""
        from collections import Counter

        from peftc.precision import name_of

        tensors = self.module.parameters() if self.module is not None else self.program.state_dict.values()
        counts: Counter[torch.dtype] = Counter()
        for tensor in tensors:
            if tensor.is_floating_point():
                counts[tensor.dtype] += tensor.numel()
        return name_of(counts.most_common(1)[0][0]) if counts else "fp32"

    @property
    def tied_embeddings(self) -> bool | None:
        """Whether the model declares tied input/output embeddings (transformers ``tie_word_embeddings``);
        None when unknown (an exported program)."""
        if self.module is None:
            return None
        return bool(getattr(getattr(self.module, "config", None), "tie_word_embeddings", False))


def load_model(
    spec: Any,
    *,
    inputs: list[str] | tuple[str, ...] = (),
    allow_pickle: bool = False,
    workdir: str | None = None,
    task: str | None = None,
) -> LoadedModel:
    """Load the base model named by ``spec`` (or wrap an ``nn.Module``/``ExportedProgram`` object).

    Args:
        spec: a path, ``pkg.module:factory``, an ``nn.Module`` or a ``torch.export.ExportedProgram``.
        inputs: ``--input`` texts overriding the derived input signature.
        allow_pickle: let ``.pt2`` files and HF ``pytorch_model.bin`` weights be unpickled.
        workdir: the directory ``pkg.module:factory`` modules are imported from, besides ``sys.path``
            (default: the working directory, as ``python -m`` does).
        task: ``text-generation`` (``peftc/loaders/causal.py``); ``none``: the model's own forward; None:
            inferred from ``config.architectures`` (a causal LM class → ``text-generation``) unless
            ``inputs`` are given.

    Raises:
        InputError: the spec names nothing loadable (the message says what was tried).
    """
    override = parse_inputs(inputs) if inputs else None
    if task not in (None, causal.NO_TASK) and (override is not None or isinstance(spec, torch.export.ExportedProgram)):
        raise InputError(f"--task {task} derives the inputs of a Hugging Face model; leave out --input")
    return _load(spec, override, allow_pickle, workdir, task)


def _load(
    spec: Any, override: InputSignature | None, allow_pickle: bool, workdir: str | None, task: str | None
) -> LoadedModel:
    if isinstance(spec, torch.export.ExportedProgram):
        return LoadedModel("<ExportedProgram>", "exported", None, spec, override or from_program(spec))
    if isinstance(spec, torch.nn.Module):
        return _finish(LoadedModel(f"<{type(spec).__name__}>", "module", spec, None, None), override, task)
    text = str(spec)
    if text.startswith(TIMM_PREFIX):
        module, digest, kwargs = load_timm(text, allow_pickle, workdir)
        loaded = LoadedModel(text, "timm", module, None, None, {digest[0]: digest[1]})
        loaded.signature, loaded.image_size = from_timm(module, kwargs)
        return _finish(loaded, override, task)
    path = cached(text, "model") if is_hub_id(text) else Path(text)
    if path.is_dir():
        return _finish(_load_huggingface(path, allow_pickle), override, task)
    if path.suffix == ".pt2" and path.exists() and reading.check_regular(path) >= 0:
        program = ir.load_program(path, allow_pickle=allow_pickle)
        files = {path.name: sha256_file(path)}
        return LoadedModel(text, "exported", None, program, override or from_program(program), files)
    if ":" in text and not path.exists():
        return _finish(_load_factory(text, workdir or os.getcwd()), override, task)
    raise InputError(
        f"cannot load model {text!r}: expected a Hugging Face model directory, a .pt2 file, pkg.module:factory, "
        "or timm:NAME@WEIGHTS"
    )


def _finish(model: LoadedModel, override: InputSignature | None, task: str | None = None) -> LoadedModel:
    module = model.module
    _check_finite(model.spec, module)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if hasattr(getattr(module, "config", None), "use_cache"):
        module.config.use_cache = False
    model.task = None if task == causal.NO_TASK else task or (None if override else causal.inferred_task(module))
    if model.task:
        if model.kind == "module":  # the caller's object keeps its own forward
            model.module = module = copy.deepcopy(module)
        attach = seq2seq.attach if model.task in seq2seq.TASKS else causal.attach
        model.signature = attach(module, model.task)
        return model
    if override is None and model.signature is None and type(module).__module__.startswith("timm."):
        model.signature, model.image_size = from_timm(module)
    model.signature = override or model.signature or from_transformers(module)
    if model.signature is None:
        raise InputError(
            f"cannot derive the inputs of {type(module).__name__}; describe them with "
            "--input name:dims:dtype (e.g. --input x:batch,16:float32)"
        )
    if override is None and model.signature.names == ["pixel_values"] and model.image_size is None:
        model.image_size = vision.hf_note(module, model.signature)
    if override is None and "height" in model.signature.dims and vision.interpolates(module):
        if model.kind == "module":  # the caller's object keeps its own forward
            model.module = module = copy.deepcopy(module)
        vision.attach(module)
    return model


def _check_finite(source: str, module: torch.nn.Module) -> None:
    """Every float weight of the base is finite: a NaN or Inf there makes every output non-finite, and the
    verification would otherwise report the artifact (or the adapter) as wrong."""
    buffers = {name for name, _ in module.named_buffers()}  # a mask buffer may hold -inf on purpose: NaN only
    for name, tensor in module.state_dict(keep_vars=False).items():
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        values = tensor.float() if tensor.itemsize == 1 else tensor
        bad = torch.isnan(values) if name in buffers else ~torch.isfinite(values)
        if bool(bad.any()):
            what = "NaN" if bool(torch.isnan(values).any()) else "Inf"
            raise InputError(
                f"{source}: the base model's weight {name!r} holds {what}; the base checkpoint must be finite "
                "(every output would be non-finite, whatever the adapter)"
            )


def _load_huggingface(path: Path, allow_pickle: bool) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.exists():
        raise InputError(f"{path}: not a Hugging Face model directory (no config.json)")
    import transformers

    weights = sorted(path.glob("*.safetensors"))
    for file in [config_file, *weights]:  # transformers would block on a FIFO, or read /dev/zero forever
        reading.check_regular(file, reading.JSON_LIMIT * 16 if file == config_file else None, "model config")
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
    from peftc.quant.loading import load_quantized, quantization_config
    from peftc.verification.oracles import QUANTIZED_FROM

    quant = quantization_config(path) if weights else None
    try:
        if quant is not None:
            module = load_quantized(path, cls, config, quant)
            setattr(module, QUANTIZED_FROM, str(path))  # PEFT's QLoRA oracle loads it with bitsandbytes
        else:
            module, info = cls.from_pretrained(
                str(path), config=config, local_files_only=True, use_safetensors=bool(weights), output_loading_info=True
            )
            _check_complete(path, module, info)
    except PeftcError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot load {getattr(cls, '__name__', cls)}: {first_line(e)}") from e
    files = {f.name: sha256_file(f) for f in [config_file, *weights]}
    return LoadedModel(str(path), "huggingface", module, None, None, files)


def _check_complete(path: Path, module: torch.nn.Module, info: dict[str, Any]) -> None:
    """Every weight of the model class is in the checkpoint: transformers initialises a missing one at random,
    so the artifact and PEFT's oracle would each compute with other values."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise InputError(
            f"{path}: the checkpoint lacks {len(missing)} weight(s) of {type(module).__name__} (first {missing[0]!r}), "
            "which transformers would initialise at random; give the checkpoint the model was saved as"
        )


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
