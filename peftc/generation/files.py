"""The model directory's config, generation config and tokenizer files, copied into a generation artifact.

They are listed in the manifest with their sha256 like every other artifact file, so ``peftc generate``
can tokenize with ``transformers.AutoTokenizer`` loaded from the artifact directory alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from peftc import reading

FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
)  # fmt: skip
LIMIT = 64 * 1024 * 1024


def copy_model_files(model_dir: Path, directory: Path, taken: tuple[str, ...]) -> tuple[str, ...]:
    """Copy those of :data:`FILES` that ``model_dir`` holds into ``directory`` (never over ``taken``, the
    artifact's own files); return the names copied."""
    copied = []
    for name in FILES:
        source = model_dir / name
        if name in taken or not source.exists():
            continue
        reading.check_regular(source, LIMIT, "model file")
        shutil.copyfile(source, directory / name)
        copied.append(name)
    return tuple(copied)


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds tokenizer files ``AutoTokenizer`` reads."""
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
