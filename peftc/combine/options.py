"""What a combination is asked to do: :class:`CombineOptions`, checked when made.

The same options come from ``peftc combine`` flags and from ``peftc compile --combine M[:k=v,…]``
(:func:`parse_spec`); both refuse what cannot mean anything (a density outside (0, 1], a weight count
that is not the adapter count, OPCM without an order) with one line naming the option.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from peftc.errors import InputError, one_of

METHODS = (
    "cat",
    "svd",
    "task-arithmetic",
    "ties",
    "dare-linear",
    "dare-ties",
    "magnitude-prune",
    "breadcrumbs",
    "lines",
    "pcb",
    "opcm",
)
"""Every combination method (README "Combining adapters" gives each formula)."""

CONVENTIONS = ("paper", "peft", "mergekit")
"""Where the reference implementations disagree (``peftc/combine/consensus.py``)."""

LOW_RANK = ("cat", "svd")
"""Methods whose result is written as a PEFT LoRA adapter (when every combined tensor is a linear one)."""
SPARSE = ("ties", "dare-linear", "dare-ties", "magnitude-prune", "breadcrumbs")
"""Methods that trim each task vector to ``density`` first."""
RANDOM = ("dare-linear", "dare-ties")
"""Methods that draw random masks (from ``seed``)."""


@dataclasses.dataclass(frozen=True)
class CombineOptions:
    """One combination: the method and its parameters (every field has a default but ``method``)."""

    method: str
    weights: tuple[float, ...] | None = None
    """One weight per adapter (default 1 each); a negative weight negates that task vector."""
    density: float | None = None
    """Fraction of each task vector's entries kept by the trimming methods (default 0.2 for ties and
    magnitude-prune as in the TIES paper, 0.5 for DARE and breadcrumbs, 0.1 for PCB as its reference)."""
    seed: int = 0
    """Seed of DARE's random masks (each tensor's mask is drawn from the seed, the tensor and the adapter)."""
    convention: str = "paper"
    """Sign election, normalisation and DARE rescale: ``paper``, ``peft`` or ``mergekit``."""
    scale: float = 1.0
    """λ: the merged task vector is multiplied by it."""
    rank: int | None = None
    """svd: the rank kept (default: the largest input rank, as PEFT)."""
    gamma: float = 0.01
    """breadcrumbs: fraction of the largest-magnitude entries dropped as outliers."""
    alpha: float | None = None
    """lines: scale of the first block (default 1/T, LiNeS' multi-task rule); opcm: the fraction of the
    merged update's singular-value mass whose directions a new task is projected away from (default 0.5)."""
    beta: float | None = None
    """lines: added scale at the last block (λ(l) = α + β·l/(L−1); default 1 − α)."""
    order: tuple[int, ...] | None = None
    """opcm: the order the adapters arrive in (0-based indices into the adapter list; required)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: choose {one_of(METHODS)}")
        if self.convention not in CONVENTIONS:
            raise InputError(f"--convention {self.convention!r}: choose {one_of(CONVENTIONS)}")
        if self.density is not None and not (0.0 < self.density <= 1.0):
            raise InputError(f"--density {self.density}: give a fraction in (0, 1]")
        if not (0.0 <= self.gamma < 1.0):
            raise InputError(f"gamma {self.gamma}: give a fraction in [0, 1)")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"--rank {self.rank}: give a positive rank")
        for name in ("scale", "alpha", "beta", *(("weights",) if self.weights else ())):
            values = getattr(self, name)
            for value in values if isinstance(values, tuple) else (values,):
                if value is not None and not math.isfinite(value):
                    raise InputError(f"--{name} {value}: give a finite number")
        if self.method == "opcm" and self.alpha is not None and not (0.0 <= self.alpha <= 1.0):
            raise InputError(f"alpha {self.alpha}: opcm's alpha is a fraction in [0, 1]")

    @property
    def kept(self) -> float:
        """The density in effect (the method's default when none was given)."""
        if self.density is not None:
            return self.density
        return 0.2 if self.method in ("ties", "magnitude-prune") else 0.1 if self.method == "pcb" else 0.5

    def checked_for(self, count: int) -> CombineOptions:
        """These options for ``count`` adapters (weights filled in).

        Raises:
            InputError: a weight count that is not ``count``; opcm without a complete ``order``.
        """
        if count < 1:
            raise InputError("combine: give at least one --adapter")
        if self.weights is not None and len(self.weights) != count:
            raise InputError(f"--weights: {len(self.weights)} weight(s) for {count} adapter(s); give one per adapter")
        if self.method == "opcm":
            if self.order is None:
                raise InputError("opcm merges adapters one at a time: give their order (--order 0,1,…)")
            if sorted(self.order) != list(range(count)):
                raise InputError(f"--order {','.join(map(str, self.order))}: give each of 0..{count - 1} once")
        return dataclasses.replace(self, weights=self.weights or (1.0,) * count)

    def record(self) -> dict[str, Any]:
        """The parameters as the manifest and the adapter config record them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["density"] = self.kept if self.method in (*SPARSE, "pcb") else self.density
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


_NUMBERS = {"density": float, "seed": int, "scale": float, "rank": int, "gamma": float, "alpha": float, "beta": float}


def parse_spec(spec: str) -> CombineOptions:
    """``METHOD[:key=value,…]`` (``peftc compile --combine``) as options; weights and order are
    ``/``-separated (``ties:density=0.5,weights=1/0.5``).

    Raises:
        InputError: an unknown key or a value that is not a number.
    """
    method, _, rest = spec.partition(":")
    fields: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise InputError(f"--combine {spec!r}: {item!r} is not key=value")
        try:
            if key in _NUMBERS:
                fields[key] = _NUMBERS[key](value)
            elif key in ("weights", "order"):
                kind = float if key == "weights" else int
                fields[key] = tuple(kind(v) for v in value.split("/"))
            elif key == "convention":
                fields[key] = value
            else:
                known = one_of(sorted([*_NUMBERS, "weights", "order", "convention"]))
                raise InputError(f"--combine {spec!r}: unknown parameter {key!r}; known: {known}")
        except ValueError as e:
            raise InputError(f"--combine {spec!r}: {key}={value!r} is not a number") from e
    return CombineOptions(method=method.strip(), **fields)


def from_record(record: Mapping[str, Any]) -> CombineOptions:
    """Options back from :meth:`CombineOptions.record` (a manifest's ``combine`` entry)."""
    fields = {f.name for f in dataclasses.fields(CombineOptions)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in fields}
    return CombineOptions(**values)
