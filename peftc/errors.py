"""The peftc error tree.

Every error a user can cause is a :class:`PeftcError` whose message names the file, key, module or
shape at fault and what to do about it. The CLI prints ``str(error)`` on one line and exits with
``error.exit_code``:

* 1: the artifact was built but its numbers disagree with the oracle (:class:`VerificationError`);
* 2: bad or unsupported input (:class:`InputError`, :class:`UnsupportedError`);
* 3: an internal failure of a pass or backend (:class:`PassError`), i.e. a peftc bug.
"""

from __future__ import annotations

from collections.abc import Sequence


class PeftcError(Exception):
    """Base class of every error peftc raises on purpose."""

    exit_code = 2


class InputError(PeftcError):
    """A model, adapter, config or path that is malformed or inconsistent with the base model."""


class UnsupportedError(PeftcError):
    """Valid input that peftc does not handle (yet); the message names the feature and an alternative."""


class BackendUnavailable(UnsupportedError):
    """A target whose runtime library is not installed or cannot run on this machine."""


class PassError(PeftcError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    exit_code = 3


class PreconditionError(PassError):
    """A pass was handed a program that does not satisfy its ``requires``."""


class PostconditionError(PassError):
    """A pass produced a program that does not satisfy its ``ensures`` or the IR invariants."""


class VerificationError(PeftcError):
    """The compiled artifact's outputs differ from the oracle beyond tolerance.

    Attributes:
        table: the rendered comparison table (one row per case and output).
    """

    exit_code = 1

    def __init__(self, message: str, table: str = "") -> None:
        super().__init__(message)
        self.table = table


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line error messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_of(values: Sequence[str]) -> str:
    """Render a short list of allowed values for an error message."""
    shown = ", ".join(repr(v) for v in list(values)[:12])
    more = len(values) - 12
    return shown + (f" (+{more} more)" if more > 0 else "")
