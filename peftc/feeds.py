"""Checking a call's inputs against the artifact's signature, before any target runs them.

``peftc.load(out)(**inputs)`` hands every target the same checked arrays; a call that does not fit
raises :class:`~peftc.errors.InputError` with one line naming the input, in this order:

1. names: every input the model takes, nothing else (an input with a default, ``token_type_ids``,
   may be left out: it is filled with its default, shaped like the inputs given);
2. rank: as many dims as the signature lists;
3. dtype, converted only where no value changes meaning (below);
4. dims: a static dim has its size; a named dim (``batch``, ``seq``) has one size across all inputs,
   within its recorded ``min..max`` and a multiple of its recorded ``multiple`` (a timm ViT's image side:
   its patch size), and within a TensorRT engine's profile (run by its own runtime);
5. values: an integer input that indexes an embedding lies in ``[0, rows)`` of it (``input_ids`` within
   the vocabulary, no negative ids), recorded at compile time as ``target.index_ranges``.

Dtypes: a float input takes any float array (float64 is rounded to the input's float32 or float16,
as numpy arrays are float64 by default); integers and bools are refused there (e.g. an un-normalised
uint8 image). An integer input takes any integer array whose values fit its dtype (int32 ids for
int64, and back), and bools where it is a mask; floats are refused, never truncated. A bool input
takes bools, or integers that are all 0 or 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peftc.errors import InputError
from peftc.loaders.inputs import DimSpec, InputSignature, TensorInput, with_defaults

_NUMPY = {
    "float32": np.float32, "float16": np.float16, "bfloat16": np.float32,  # the target casts bf16 itself
    "int64": np.int64, "int32": np.int32, "bool": np.bool_,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class InputCheck:
    """What a call must give: :meth:`__call__` checks and converts it (see the module docstring)."""

    names: tuple[str, ...]
    """The inputs a call gives (the runner's; ones it fills itself, like ``adapter_index``, left out)."""
    specs: Mapping[str, TensorInput]
    dims: Mapping[str, DimSpec]
    ranges: Mapping[str, tuple[int, int]]
    """Input → ``[low, high)`` of its values."""
    profiles: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    """Input → its min and max shape (a TensorRT engine's optimization profile)."""

    @classmethod
    def from_target(cls, target: Mapping[str, Any], names: Sequence[str], *, engine: bool, where: str) -> InputCheck:
        """The check of a manifest's ``target`` record for a runner taking ``names``.

        Args:
            engine: the target's own runtime runs it (its TensorRT profile applies).
            where: the manifest, for error messages.

        Raises:
            InputError: ``target.signature``, ``target.index_ranges`` or the profile is malformed.
        """
        try:
            signature = InputSignature.from_json(target["signature"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{where}: target.signature is missing or malformed ({type(e).__name__}: {e})") from e
        for spec in signature.inputs:
            if spec.dtype not in _NUMPY or not all(isinstance(d, (int, str)) for d in spec.shape):
                raise InputError(f"{where}: target.signature: input {spec.name!r} has a malformed dtype or shape")
        for dim in signature.dims.values():
            if type(dim.multiple) is not int or dim.multiple < 1:
                raise InputError(f"{where}: target.signature: dim {dim.name!r} has multiple {dim.multiple!r}")
        ranges = _pairs(target.get("index_ranges", {}), f"{where}: target.index_ranges")
        profiles = {}
        if engine and isinstance(target.get("tensorrt"), dict):
            try:
                for p in target["tensorrt"].get("profile") or []:
                    profiles[p["name"]] = (tuple(p["min"]), tuple(p["max"]))
            except (KeyError, TypeError) as e:
                raise InputError(f"{where}: target.tensorrt.profile is malformed ({type(e).__name__}: {e})") from e
        specs = {s.name: s for s in signature.inputs if s.name in names}
        return cls(tuple(names), specs, dict(signature.dims), ranges, profiles)

    def __call__(self, feeds: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """``feeds`` checked and converted to the signature's dtypes, and the size of each named dim.

        Raises:
            InputError: naming the input and the rule it breaks.
        """
        feeds = with_defaults(list(self.specs.values()), feeds)
        missing = [n for n in self.names if n not in feeds]
        extra = [n for n in feeds if n not in self.names]
        for name in feeds if missing else ():  # an input with a default is left out when the others' ranks are off
            spec = self.specs.get(name)
            if spec is not None and np.ndim(feeds[name]) != len(spec.shape):
                self._check_shape(name, np.asarray(feeds[name]), spec, {})
        if missing or extra:
            raise InputError(
                f"inputs do not match the model: missing {missing}, unexpected {extra}; expected {list(self.names)}"
            )
        arrays: dict[str, np.ndarray] = {}
        sizes: dict[str, tuple[int, str]] = {}
        for name in self.names:
            array = np.asarray(feeds[name])
            spec = self.specs.get(name)
            if spec is not None:
                array = _convert(name, array, spec)
                self._check_shape(name, array, spec, sizes)
            if name in self.ranges and array.size:
                _check_values(name, array, self.ranges[name])
            arrays[name] = array
        self._check_sums(sizes)
        return arrays, {dim: size for dim, (size, _) in sizes.items()}

    def _check_sums(self, sizes: Mapping[str, tuple[int, str]]) -> None:
        """A dim that is the sum of others (``total`` = ``past`` + ``seq``) has that size."""
        for dim in self.dims.values():
            if dim.sum_of and dim.name in sizes and all(p in sizes for p in dim.sum_of):
                want = sum(sizes[p][0] for p in dim.sum_of)
                size, name = sizes[dim.name]
                if size != want:
                    parts = " + ".join(f"{p} ({sizes[p][0]}, from {sizes[p][1]!r})" for p in dim.sum_of)
                    raise InputError(f"input {name!r}: {dim.name} is {size}, but {parts} = {want}")

    def batch(self, arrays: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> int | None:
        """The batch size of a checked call: its ``batch`` dim, else the first dim of its first input."""
        if "batch" in sizes:
            return sizes["batch"]
        first = next((a for a in arrays.values() if a.ndim), None)
        return None if first is None else int(first.shape[0])

    def _check_shape(self, name: str, array: np.ndarray, spec: TensorInput, sizes: dict[str, tuple[int, str]]) -> None:
        wanted = "[" + ", ".join(str(d) for d in spec.shape) + "]"
        if array.ndim != len(spec.shape):
            raise InputError(f"input {name!r}: {array.ndim} dims {list(array.shape)}, expected {wanted}")
        for axis, (size, dim) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise InputError(f"input {name!r}: dim {axis} is {size}, expected {dim} (shape {wanted})")
                continue
            if dim in sizes and sizes[dim][0] != size:
                seen, other = sizes[dim]
                raise InputError(f"input {name!r}: dim {axis} ({dim}) is {size}, but input {other!r} has {dim}={seen}")
            sizes.setdefault(dim, (size, name))
            bounds = self.dims.get(dim)
            if bounds is not None and size < bounds.min:
                raise InputError(f"input {name!r}: dim {axis} ({dim}) is {size}, below its minimum {bounds.min}")
            if bounds is not None and bounds.max is not None and size > bounds.max:
                raise InputError(f"input {name!r}: dim {axis} ({dim}) is {size}, above its maximum {bounds.max}")
            if bounds is not None and size % bounds.multiple:
                raise InputError(
                    f"input {name!r}: dim {axis} ({dim}) is {size}, not a multiple of {bounds.multiple} "
                    f"(the model takes {dim} {bounds.min}, {bounds.min + bounds.multiple}, ..)"
                )
        low, high = self.profiles.get(name, ((), ()))
        if low and not all(a <= s <= b for a, s, b in zip(low, array.shape, high, strict=False)):
            raise InputError(
                f"input {name!r}: shape {list(array.shape)} is outside the TensorRT engine's profile "
                f"{list(low)}..{list(high)} (compile with --profile to widen it)"
            )


def _convert(name: str, array: np.ndarray, spec: TensorInput) -> np.ndarray:
    """``array`` in the input's dtype, if that changes no value's meaning (the module docstring)."""
    want = np.dtype(_NUMPY[spec.dtype])
    kind = array.dtype.kind
    if want.kind == "f":
        if kind != "f":
            raise InputError(f"input {name!r}: {array.dtype} values, but the input is {spec.dtype}; pass floats")
        return array.astype(want, copy=False)
    if kind not in "iub":
        raise InputError(
            f"input {name!r}: {array.dtype} values, but the input is {spec.dtype}; pass integers "
            "(floats are never truncated)"
        )
    if want.kind == "b":
        if kind != "b" and array.size and not np.isin(array, (0, 1)).all():
            raise InputError(f"input {name!r}: a bool input takes bools or 0/1, got other values")
        return array.astype(want, copy=False)
    if kind == "b" and spec.kind != "mask":
        raise InputError(f"input {name!r}: bool values, but the input is {spec.dtype} and not a mask; pass integers")
    if kind != "b" and array.dtype != want and array.size:
        info = np.iinfo(want)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InputError(f"input {name!r}: values {low}..{high} do not fit the input's dtype {spec.dtype}")
    return array.astype(want, copy=False)


def _check_values(name: str, array: np.ndarray, bounds: tuple[int, int]) -> None:
    low, high = bounds
    bad = (array < low) | (array >= high)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"input {name!r}: value {array[where]} at {list(where)} is outside [{low}, {high}) "
            "(the rows of the embedding it indexes)"
        )


def _pairs(data: Any, where: str) -> dict[str, tuple[int, int]]:
    """``{name: [low, high]}`` with integer bounds, low < high."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected an object of input name → [low, high]")
    out = {}
    for name, pair in data.items():
        ok = isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair) and pair[0] < pair[1]
        if not ok:
            raise InputError(f"{where}: {name!r} should be [low, high] with integers low < high, got {pair!r}")
        out[name] = (pair[0], pair[1])
    return out
