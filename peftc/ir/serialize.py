"""Saving and loading programs as ``.pt2`` files without unpickling untrusted data.

``torch.export.load`` unpickles in three places: weights or constants stored with ``use_pickle``
(tensor subclasses), custom/opaque object constants, and, when the safe loader fails, the example
inputs (it retries with ``weights_only=False``). :func:`load_program` reads the archive's JSON
configs first and refuses any of those unless the caller passes ``allow_pickle=True``; it also
checks that the example inputs load with ``weights_only=True`` so the unsafe retry never runs.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch

from peftc.errors import InputError
from peftc.ir.program import Program


def save_program(program: Program, path: str | Path) -> None:
    """Write ``program`` to ``path`` with ``torch.export.save``."""
    torch.export.save(program, str(path))


def load_program(path: str | Path, *, allow_pickle: bool = False) -> Program:
    """Load a ``.pt2`` file written by ``torch.export.save``.

    Raises:
        InputError: the file is missing, not a pt2 archive, or would need unpickling
            (and ``allow_pickle`` is False).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not allow_pickle:
        for reason in pickled_payloads(path):
            raise InputError(
                f"{path}: {reason}; loading it would unpickle data. "
                "Re-export it with plain tensors, or pass --allow-pickle if you trust the file."
            )
    try:
        return torch.export.load(str(path))
    except Exception as e:
        raise InputError(f"{path}: not a loadable torch.export program ({type(e).__name__}: {e})") from e


def pickled_payloads(path: Path) -> list[str]:
    """Reasons the archive at ``path`` would be unpickled by ``torch.export.load`` (empty if none)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path}: not a torch.export .pt2 archive ({e})") from e
    reasons = []
    with archive:
        names = archive.namelist()
        if not any(n.split("/", 1)[-1].startswith("models/") for n in names):
            raise InputError(f"{path}: not a torch.export .pt2 archive (no models/ entry)")
        for name in names:
            inner = name.split("/", 1)[-1]
            if inner.endswith(("weights_config.json", "constants_config.json")):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (json.JSONDecodeError, AttributeError) as e:
                    raise InputError(f"{path}: corrupt archive entry {name} ({e})") from e
                for fqn, entry in config.items():
                    if entry.get("use_pickle"):
                        reasons.append(f"tensor {fqn!r} is stored pickled")
                    elif not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                        reasons.append(f"constant {fqn!r} is a pickled object")
            elif inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt"):
                reasons.append(f"entry {inner} uses the legacy pickled format")
            elif inner.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:
                    reasons.append(f"example inputs {inner} are not plain tensors")
    return reasons
