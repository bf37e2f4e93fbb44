"""Was the adapter trained on this model? ``base_model_name_or_path`` against the model given.

Shapes must already match for an adapter to load, so the risk left is another model of the same
shapes (a Llama LoRA on a Qwen2 base). PEFT records the model an adapter was trained on as
``base_model_name_or_path`` (a hub id or a path), and sometimes its class (``auto_mapping``). The rule:

* Names are compared lower-cased with everything but letters and digits removed.
* The adapter's model name is the last component of ``base_model_name_or_path`` (for a Hugging Face
  cache path, ``…/models--ORG--NAME/snapshots/…``, the repository's NAME).
* The model's names are every component of its path (the model directory, the ``.pt2`` file, or the
  path in its config's ``_name_or_path``), the ``_name_or_path`` recorded in its ``config.json``, and a
  timm model's architecture name.
* They agree when the adapter's name is part of one of the model's names, or the last component of
  one of the model's paths or recorded names (at least 4 characters) is part of the adapter's.
* When they do not agree, peftc warns, unless the adapter's config names its model class
  (``auto_mapping.base_model_class``) and that is the given model's class.
* Nothing is compared when the adapter names no model, or the model has no name (a factory or module
  without a Hugging Face config).

Only the model's own files are read (its ``config.json``); nothing the adapter names is opened.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftc.loaders.models import LoadedModel
    from peftc.methods.base import Adapter

CONFIG_LIMIT = 1 << 20
"""A ``config.json`` larger than this is not read for its recorded name."""
_CACHE_REPO = re.compile(r"^models--(?:[^/]+--)?(?P<name>[^/]+)$")


class BaseModelWarning(UserWarning):
    """An adapter's config names another model than the one it is compiled onto."""


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What names the given model: its paths' components, recorded names, class and type."""

    describe: str
    """How the warning names the model (its spec)."""
    names: frozenset[str]
    """Every normalised name of the model (path components, recorded ``_name_or_path``, timm name)."""
    own_names: frozenset[str]
    """The normalised last components of its paths and recorded names (what may be part of the adapter's)."""
    class_name: str | None
    model_type: str | None


def normalise(text: str) -> str:
    """Lower case, letters and digits only: ``Llama-2-7b_hf`` → ``llama27bhf``."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def adapter_model_name(named: str) -> str:
    """The model name in a ``base_model_name_or_path`` value: its last component, or the repository
    name of a Hugging Face cache path."""
    parts = [p for p in re.split(r"[/\\]", named.strip()) if p]
    for part in reversed(parts):
        match = _CACHE_REPO.match(part)
        if match:
            return match.group("name")
    return parts[-1] if parts else ""


def identify(loaded: LoadedModel) -> ModelIdentity:
    """The names of a loaded model (see the module docstring for which)."""
    paths: list[PurePath] = []
    recorded: list[str] = []
    if loaded.kind in ("huggingface", "exported"):
        paths.append(Path(loaded.spec).resolve())
    config = getattr(loaded.module, "config", None)
    named = getattr(config, "_name_or_path", None)
    if isinstance(named, str) and named:
        paths.append(PurePath(named))
    for directory in dict.fromkeys(Path(path).resolve() for path in paths if Path(path).is_dir()):
        recorded += _recorded_names(directory)
    if loaded.kind == "timm":
        recorded.append(loaded.spec.removeprefix("timm:").split("@")[0].split(",")[0])
    names = {normalise(part) for path in paths for part in path.parts}
    names |= {normalise(p.stem) for p in paths if p.suffix == ".pt2"}
    own = {normalise(p.stem if p.suffix == ".pt2" else p.name) for p in paths}
    for text in recorded:
        names.add(normalise(adapter_model_name(text)))
        own.add(normalise(adapter_model_name(text)))
    class_name = type(loaded.module).__name__ if loaded.module is not None else None
    return ModelIdentity(
        describe=loaded.spec,
        names=frozenset(n for n in names if n),
        own_names=frozenset(n for n in own if n),
        class_name=class_name,
        model_type=getattr(config, "model_type", None) or None,
    )


def _recorded_names(directory: Path) -> list[str]:
    """The ``_name_or_path`` a model directory's ``config.json`` records (older transformers wrote it)."""
    file = directory / "config.json"
    try:
        if not file.is_file() or file.stat().st_size > CONFIG_LIMIT:
            return []
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return []
    named = data.get("_name_or_path") if isinstance(data, dict) else None
    return [named] if isinstance(named, str) and named else []


def mismatch(adapter: str, config: Mapping[str, Any], config_path: Any, model: ModelIdentity) -> str | None:
    """The warning for an adapter whose config names another model than ``model``, else None."""
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip() or not model.names:
        return None
    wanted = normalise(adapter_model_name(named))
    if not wanted:
        return None
    if any(wanted in name for name in model.names) or any(
        len(name) >= 4 and name in wanted for name in model.own_names
    ):
        return None
    mapping = config.get("auto_mapping")
    trained_class = mapping.get("base_model_class") if isinstance(mapping, Mapping) else None
    if trained_class and trained_class == model.class_name:
        return None
    given = ", ".join(filter(None, [model.class_name, model.model_type and f"model_type {model.model_type}"]))
    trained = f" ({trained_class})" if trained_class else ""
    return (
        f"adapter {adapter!r} was trained on {named!r}{trained} (base_model_name_or_path in {config_path}), but the "
        f"model given is {model.describe!r}" + (f" ({given})" if given else "") + "; the shapes fit, but an adapter "
        "computes something else on another model: check that this is the model it was trained on"
    )


def checked(adapters: Sequence[Adapter], loaded: LoadedModel, say: Callable[[str], None]) -> tuple[Adapter, ...]:
    """``adapters``, each with the :func:`mismatch` warning added to its warnings (so the manifest
    records it) where its config names another model; each warning is also announced to ``say``
    (the CLI's stderr) and raised as a :class:`BaseModelWarning`."""
    model = identify(loaded)
    found = []
    for adapter in adapters:
        warning = mismatch(adapter.name, adapter.source.config, adapter.source.config_path, model)
        if warning:
            say(f"warning: {warning}")
            warnings.warn(warning, BaseModelWarning, stacklevel=2)
            adapter = dataclasses.replace(adapter, warnings=(*adapter.warnings, warning))
        found.append(adapter)
    return tuple(found)
