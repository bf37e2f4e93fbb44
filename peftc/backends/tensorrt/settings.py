"""TensorRT build settings as plain data: optimization profiles, precision, refit, weight stripping.

Nothing here imports TensorRT, so every rule is unit-tested on machines without it or without a GPU.

**Profiles.** TensorRT needs, for every dynamic input dim, the smallest, the typical and the largest
size the engine will see (one optimization profile). peftc derives them from the program's named
dynamic dims (``batch``, ``seq``…, see ``peftc.loaders.inputs``): ``min`` is the dim's lower bound,
``max`` its upper bound or :data:`DEFAULT_MAX` when unbounded, ``opt`` :data:`DEFAULT_OPT` (clamped),
for an image side the model's own size. A dim recorded with a ``multiple`` (a ViT's image side: its
patch size) gets min, opt and max that are multiples of it, and an override that is not is refused.
A dim that may be empty keeps ``min`` 0 (a generation step's ``past`` at prefill: TensorRT's empty
tensors); ``max`` is at least 1.
``--profile name:min,opt,max`` overrides one dim. Every profile must contain the sizes peftc verifies
with (the signature's cases), because an engine that cannot run them cannot be checked.

**Precision.** TensorRT 11 and TensorRT-RTX only build *strongly typed* networks: the precision of
every layer is the dtype in the ONNX. ``fp32`` builds the ONNX as exported; ``fp16``/``bf16`` build a
copy whose float initializers and computation are cast to that type, with fp32 inputs and outputs
(``peftc.backends.tensorrt.precision``). ``bf16`` needs compute capability 8.0 or newer.

**Refit and stripping.** ``refit`` builds an engine whose weights can be replaced after the build
(``BuilderFlag.REFIT``): that is what adapter swapping uses. ``strip_weights`` leaves the weights out of
the plan (``BuilderFlag.STRIP_PLAN``); the runner refits them from the artifact's ONNX when it loads.
Stripping without ``refit`` uses ``REFIT_IDENTICAL`` (the weights may only be the build-time ones).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import DimSpec, InputSignature
from peftc.loaders.vision import MAX_SCALE

PRECISIONS = ("fp32", "fp16", "bf16")
MIN_COMPUTE_CAPABILITY = {"fp32": (0, 0), "fp16": (5, 3), "bf16": (8, 0)}
DEFAULT_MAX = {"batch": 32, "seq": 512}
DEFAULT_MAX_OTHER = 64
DEFAULT_OPT = {"batch": 1, "seq": 128, "past": 128}
IMAGE_DIMS = ("height", "width")
"""An image's sides: ``opt`` is the model's own size (``max`` / ``MAX_SCALE``, a multiple of the dim's
``multiple``: ``peftc/loaders/vision.py``)."""

_PROFILE = re.compile(r"^(?P<dim>[A-Za-z_]\w*):(?P<min>\d+),(?P<opt>\d+),(?P<max>\d+)$")


@dataclasses.dataclass(frozen=True)
class DimProfile:
    """The range one named dynamic dim takes in the engine."""

    dim: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (0 <= self.min <= self.opt <= self.max and self.max >= 1):
            raise InputError(
                f"--profile {self.text()}: need 0 <= min <= opt <= max and max >= 1, got min={self.min}, "
                f"opt={self.opt}, max={self.max}"
            )

    def text(self) -> str:
        return f"{self.dim}:{self.min},{self.opt},{self.max}"


def parse_profile(text: str) -> DimProfile:
    """Parse ``--profile name:min,opt,max``.

    Raises:
        InputError: malformed text, or not ``0 <= min <= opt <= max`` with ``max >= 1``.
    """
    match = _PROFILE.match(text.strip())
    if not match:
        raise InputError(f"--profile {text!r}: expected name:min,opt,max with integers, e.g. seq:1,128,512")
    return DimProfile(match["dim"], int(match["min"]), int(match["opt"]), int(match["max"]))


@dataclasses.dataclass(frozen=True)
class TensorRTSettings:
    """How ``--target trt`` builds its engine (see the module docstring)."""

    profiles: tuple[DimProfile, ...] = ()
    """Overrides of the derived per-dim ranges."""
    precision: str = "fp32"
    refit: bool = False
    strip_weights: bool = False
    cache_dir: str | None = None
    """Directory for TensorRT's timing cache (and TensorRT-RTX's runtime cache), reused across builds."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        dims = [p.dim for p in self.profiles]
        repeated = sorted({d for d in dims if dims.count(d) > 1})
        if repeated:
            raise InputError(f"--profile given more than once for dim(s) {', '.join(repeated)}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TensorRTSettings:
        """Build from the CLI/API target options (``profile`` texts, ``precision``, ``refit``…)."""
        profiles = tuple(
            p if isinstance(p, DimProfile) else parse_profile(str(p)) for p in options.get("profile", ()) or ()
        )
        return cls(
            profiles=profiles,
            precision=options.get("precision") or "fp32",
            refit=bool(options.get("refit", False)),
            strip_weights=bool(options.get("strip_weights", False)),
            cache_dir=str(options["cache_dir"]) if options.get("cache_dir") else None,
        )

    @property
    def refit_mode(self) -> str | None:
        """``refit``, ``refit_identical`` (stripped, same weights only) or None (weights frozen in)."""
        if self.refit:
            return "refit"
        return "refit_identical" if self.strip_weights else None

    def to_json(self) -> dict[str, Any]:
        return {
            "profiles": [p.text() for p in self.profiles],
            "precision": self.precision,
            "refit": self.refit,
            "strip_weights": self.strip_weights,
            "cache_dir": self.cache_dir,
        }


@dataclasses.dataclass(frozen=True)
class InputProfile:
    """One input's min/opt/max shapes (what ``IOptimizationProfile.set_shape`` takes)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def dim_profiles(signature: InputSignature, overrides: Sequence[DimProfile] = ()) -> dict[str, DimProfile]:
    """The range of every dynamic dim: derived from the signature, then overridden.

    Raises:
        InputError: an override names no dynamic dim of the model, leaves the dim's declared range, or
            excludes a size peftc verifies with.
    """
    by_name = {p.dim: p for p in overrides}
    unknown = sorted(set(by_name) - set(signature.dims))
    if unknown:
        known = ", ".join(signature.dims) or "none (all inputs are static)"
        raise InputError(
            f"--profile {by_name[unknown[0]].text()}: no dynamic dim {unknown[0]!r}; the model's are {known}"
        )
    out = {}
    for dim in signature.dims.values():
        profile = by_name.get(dim.name)
        if profile is None:
            profile = _derived(dim, out, "past" in signature.dims)
        elif profile.min < dim.min or (dim.max is not None and profile.max > dim.max):
            raise InputError(
                f"--profile {profile.text()}: outside the range the model was traced with "
                f"({dim.name} {dim.min}..{dim.max if dim.max is not None else 'unbounded'})"
            )
        elif any(size % dim.multiple for size in (profile.min, profile.opt, profile.max)):
            raise InputError(
                f"--profile {profile.text()}: {dim.name} takes multiples of {dim.multiple} only "
                f"(e.g. {dim.min},{dim.min + dim.multiple},..); min, opt and max must be multiples"
            )
        out[dim.name] = profile
    for sizes in signature.cases():
        for name, size in sizes.items():
            p = out[name]
            if not p.min <= size <= p.max:
                raise InputError(
                    f"--profile {p.text()}: verification runs {name}={size}; widen the range to include it"
                )
    return out


def _derived(dim: DimSpec, parts: Mapping[str, DimProfile], step: bool) -> DimProfile:
    """``dim``'s default range; a sum dim (``total`` = ``past`` + ``seq``) adds its parts' ranges, so the
    profile's shapes agree with each other. In a generation step (``step``) ``seq`` is optimized for 1,
    the decode step's length."""
    if dim.sum_of:
        low, opt, high = (sum(getattr(parts[n], w) for n in dim.sum_of) for w in ("min", "opt", "max"))
        high = min(high, dim.max) if dim.max else high
        return DimProfile(dim.name, max(low, dim.min), min(max(opt, dim.min), high), high)
    unit = dim.multiple
    high = dim.max or (DEFAULT_MAX.get(dim.name, DEFAULT_MAX_OTHER) // unit * unit or unit)
    low = min(dim.min, high)
    default = 1 if step and dim.name == "seq" else DEFAULT_OPT.get(dim.name, low)
    if dim.name in IMAGE_DIMS and dim.max:  # the model's own size: its range ends at MAX_SCALE x that
        default = dim.max // MAX_SCALE // unit * unit
    return DimProfile(dim.name, low, min(max(default, low), high), high)


def input_profiles(signature: InputSignature, dims: Mapping[str, DimProfile]) -> tuple[InputProfile, ...]:
    """Per-input shapes for one optimization profile (static dims stay as they are)."""
    out = []
    for spec in signature.inputs:

        def shape(which: str, spec: Any = spec) -> tuple[int, ...]:
            return tuple(d if isinstance(d, int) else getattr(dims[d], which) for d in spec.shape)

        out.append(InputProfile(spec.name, shape("min"), shape("opt"), shape("max")))
    return tuple(out)


def check_precision(precision: str, compute_capability: tuple[int, int], device: str) -> None:
    """Refuse a precision the device cannot run.

    Raises:
        UnsupportedError: naming the device, its compute capability and what the precision needs.
    """
    need = MIN_COMPUTE_CAPABILITY[precision]
    if tuple(compute_capability) < need:
        have = ".".join(map(str, compute_capability))
        raise UnsupportedError(
            f"--precision {precision}: {device} (compute capability {have}) cannot run it; it needs "
            f"{need[0]}.{need[1]} or newer. Use --precision fp32"
            + (" or fp16" if tuple(compute_capability) >= MIN_COMPUTE_CAPABILITY["fp16"] else "")
        )
