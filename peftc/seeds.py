"""Seeds given by the user: integers whose derived seeds (``seed + i``) still fit torch's and numpy's
generators, refused with the flag's name otherwise (not an overflow deep inside a generator)."""

from __future__ import annotations

from typing import Any

from peftc.errors import InputError

SEED_LIMIT = 1 << 62
"""Seeds lie in ``(-SEED_LIMIT, SEED_LIMIT)``: derived seeds add at most a few thousand, and torch takes
64-bit seeds."""


def check_seed(value: Any, flag: str = "--seed") -> int:
    """``value`` as a seed.

    Raises:
        InputError: not an integer, or outside ``(-SEED_LIMIT, SEED_LIMIT)``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not -SEED_LIMIT < value < SEED_LIMIT:
        raise InputError(f"{flag} {value!r}: give an integer between -2**62 and 2**62")
    return value
