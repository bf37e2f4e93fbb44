"""Hugging Face Hub ids (``org/name``) resolved from the local cache only: peftc never downloads.

A model or adapter given as a Hub id that is not a path here is looked up in the local Hugging Face
cache (``HF_HUB_CACHE`` / ``HF_HOME``, as ``transformers`` and ``peft`` use it) with
``huggingface_hub.snapshot_download(..., local_files_only=True)``; its snapshot directory is then read
like any model or adapter directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from peftc.errors import InputError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(text: str) -> bool:
    """``org/name`` that is not a path here."""
    return bool(HUB_ID.fullmatch(text)) and not Path(text).exists()


def cached(repo_id: str, what: str) -> Path:
    """The cached snapshot directory of ``repo_id``.

    Raises:
        InputError: not in the local cache (the message says where peftc looked and how to fetch it).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        raise InputError(
            f"{what} {repo_id!r}: not a path here and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); peftc never downloads: fetch it first (hf download {repo_id}) "
            "or give its directory"
        ) from e
