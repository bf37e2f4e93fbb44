"""Log noise from third-party imports that peftc keeps off its users' terminals."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

NOISY = ("torchao", "torch.utils._pytree")
"""torchao (imported by transformers and peft too, where installed) warns at import for each CUDA
extension a CPU build cannot load, and registers enums that torch's pytree warns about."""


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers (``""``: the root logger) to ERROR for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def quiet_imports() -> contextlib.AbstractContextManager[None]:
    """The :data:`NOISY` loggers quiet for the duration."""
    return quiet(*NOISY)
