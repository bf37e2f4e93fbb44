"""The ``timm:NAME[,KEY=VALUE...]@WEIGHTS`` model source (see ``peftc/loaders/models.py``).

The model is built by ``timm.create_model(NAME, pretrained=False, KEY=VALUE...)`` (a VisionTransformer
with ``dynamic_img_size=True`` unless the spec sets it: ``peftc/loaders/vision.py``), then a safetensors
state dict is checked against it from the file's header alone and copied in tensor by tensor as it is read
(``peftc.reading.read_safetensors``'s sink), so the file's bytes are never held beside the model's.
"""

from __future__ import annotations

import difflib
import io
import json
from pathlib import Path
from typing import Any

import torch

from peftc import reading
from peftc.errors import InputError, UnsupportedError, first_line
from peftc.hashing import sha256_file
from peftc.loaders import vision

TIMM_PREFIX = "timm:"


def parse_timm_spec(text: str) -> tuple[str, dict[str, Any], str | None]:
    """``timm:NAME[,KEY=VALUE...][@WEIGHTS]`` → ``(NAME, {KEY: VALUE}, WEIGHTS or None)``.

    Raises:
        InputError: naming the malformed part.
    """
    head, _, weights = text.removeprefix(TIMM_PREFIX).partition("@")
    parts = _split_top_level(head)
    name = parts[0].strip()
    if not name:
        raise InputError(
            f"model {text!r}: expected timm:NAME[,KEY=VALUE...]@WEIGHTS, e.g. timm:vit_base_patch16_224@w.safetensors"
        )
    kwargs: dict[str, Any] = {}
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise InputError(f"model {text!r}: {part!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value.strip()
    return name, kwargs, weights.strip() or None


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[({") - (char in "])}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def load_timm(
    text: str, allow_pickle: bool, workdir: str | None
) -> tuple[torch.nn.Module, tuple[str, str], dict[str, Any]]:
    """``(module, (weights file name, sha256), kwargs)`` of a ``timm:`` spec, the state dict loaded.

    Raises:
        InputError: a malformed spec, no such model, or weights that do not fit it.
        UnsupportedError: timm cannot be imported.
    """
    name, kwargs, weights = parse_timm_spec(text)
    if weights is None:
        raise InputError(
            f"model {text!r}: no weights; peftc never downloads models, so give a local state dict: "
            f"timm:{name}@weights.safetensors"
        )
    file = Path(weights)
    if not file.is_absolute() and not file.exists() and workdir:
        file = Path(workdir) / file
    if not file.exists():
        raise InputError(f"model {text!r}: weights file {file} does not exist")
    tensors = None if file.suffix == ".safetensors" else read_state_dict(file, allow_pickle)
    try:
        import timm
    except Exception as e:
        raise UnsupportedError(
            f"model {text!r}: timm cannot be imported ({type(e).__name__}: {first_line(e)}); install it with "
            f"pip install 'peftc[timm]' and a torchvision built for the installed torch {torch.__version__} "
            "(timm imports torchvision)"
        ) from e
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise InputError(
            f"model {text!r}: timm has no model {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        )
    module, kwargs = _create_timm(timm, text, name, kwargs)
    targets = module.state_dict()
    with torch.no_grad():
        if tensors is None:  # each tensor copied in as it is read: the file is never held beside the model
            check = lambda header: _check_state_dict(text, file, targets, {k: s for k, (_, s) in header.items()})  # noqa: E731
            digest = reading.read_safetensors(file, lambda key, tensor: targets[key].copy_(tensor), check)[1]
        else:
            _check_state_dict(text, file, targets, {k: tuple(t.shape) for k, t in tensors.items()})
            module.load_state_dict(tensors)
            digest = sha256_file(file)
    return module, (file.name, digest), kwargs


def _create_timm(timm: Any, text: str, name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``timm.create_model(name, pretrained=False, **kwargs)``; a VisionTransformer with
    ``dynamic_img_size=True`` unless the spec sets it (the same weights; ``peftc/loaders/vision.py``)."""
    if "dynamic_img_size" not in kwargs:
        try:
            with torch.device("meta"):  # the class, without initialising weights
                probe = timm.create_model(name, pretrained=False, **kwargs)
        except Exception:  # reported by the real build below
            probe = None
        if vision.is_timm_vit(probe):
            kwargs = {**kwargs, "dynamic_img_size": True}
    try:
        return timm.create_model(name, pretrained=False, **kwargs), kwargs
    except Exception as e:
        raise InputError(f"model {text!r}: timm cannot build {name} with {kwargs}: {first_line(e)}") from e


def read_state_dict(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a pickled state dict when ``allow_pickle`` (loaded with
    ``weights_only=True``).

    Raises:
        InputError: a pickle without ``allow_pickle``, or a file that is not a state dict.
    """
    if file.suffix == ".safetensors":
        return reading.read_safetensors(file)[0]
    if not allow_pickle:
        raise InputError(
            f"{file}: pickled weights are refused because unpickling can run arbitrary code; save the state dict "
            "with safetensors.torch.save_file, or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    try:
        loaded = torch.load(io.BytesIO(reading.read_bytes(file)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{file}: cannot load with weights_only=True ({first_line(e)})") from e
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(f"{file}: expected a state dict (a dict of tensors)")
    return loaded


def _check_state_dict(
    text: str, file: Path, expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(shapes)) if tuple(expected[k].shape) != tuple(shapes[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
    if wrong:
        k = wrong[0]
        problems.append(f"{k} is {list(shapes[k])}, the model's is {list(expected[k].shape)}")
    if problems:
        raise InputError(
            f"{file}: does not fit {text.partition('@')[0]}: {'; '.join(problems)} (the file must hold the model's "
            "state_dict() as timm names it; model arguments go in the spec, e.g. timm:NAME,num_classes=10@FILE)"
        )
