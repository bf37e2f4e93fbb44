"""Model input signatures: names, shapes with named dynamic dims, dtypes, and seeded example values.

A signature is derived from the model kind (text: ``input_ids``/``attention_mask`` with dims
``batch`` and ``seq``, and ``token_type_ids`` (default 0) where the model has several segment types;
vision: ``pixel_values`` with dim ``batch``, and ``height``/``width`` where the model interpolates its
position embeddings, ``peftc/loaders/vision.py``) or given by the user as
``--input name:dims:dtype[:low..high]``, e.g. ``input_ids:batch,seq=1..512:int64:0..30522`` or
``pixel_values:batch,3,224,224:float32``. A dim is an integer (static) or a name (dynamic, shared by
every input that uses the same name), optionally with a range ``name=min..max``.

Tracing uses dynamic dims of at least 2 and pairwise distinct, because torch.export specialises a
dim whose example is 0 or 1 and may merge dims whose examples are equal. Verification uses several
size assignments (:meth:`InputSignature.cases`), one of them with batch 1 and every dim that may be
0 (a generation step's ``past``: the prefill) at 0.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from peftc.errors import InputError
from peftc.loaders import vision

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}  # fmt: skip

# Per-case preferred sizes: (batch, seq, other). Case 0 is also the tracing example.
_CASE_SIZES = ((2, 16, 8), (1, 9, 5), (3, 33, 11))


@dataclasses.dataclass(frozen=True)
class DimSpec:
    """A named dynamic dimension and its allowed range (``max`` None = unbounded)."""

    name: str
    min: int = 1
    max: int | None = None
    sum_of: tuple[str, ...] = ()
    """A dim whose size is the sum of these dims' (a generation step's ``total`` = ``past`` + ``seq``):
    examples follow it, torch.export infers it (``Dim.AUTO``), and a call is checked against it."""
    multiple: int = 1
    """Every size is a multiple of this (a timm ViT's image side: its patch size); ``min`` and ``max`` are."""
    natural: int | None = None
    """The model's own size of this dim (an image side: the config's image size), where it has one: the
    third verification case uses it, so the size a model was trained at is always checked."""


@dataclasses.dataclass(frozen=True)
class TensorInput:
    """One model input."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    kind: str = "float"
    """How example values are drawn: ``float`` (normal), ``index`` (uniform ints in [low, high)),
    ``mask`` (ones, with the tail of the last row zeroed when batch > 1), ``segments`` (0: one sentence,
    in even rows; a sentence pair in odd rows: 0 for the first half, 1 after)."""
    low: int = 0
    high: int = 2
    default: int | None = None
    """A call may leave the input out; the runner then fills it with this value (``token_type_ids``:
    0, as transformers does)."""


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """The inputs a program takes."""

    inputs: tuple[TensorInput, ...]
    dims: Mapping[str, DimSpec]

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def cases(self, count: int = 3) -> list[dict[str, int]]:
        """Size assignments for verification; the first one is the tracing example."""
        cases = []
        for index in range(count):
            sizes: dict[str, int] = {}
            for dim in self.dims.values():
                batch, seq, other = _CASE_SIZES[index % len(_CASE_SIZES)]
                want = batch if dim.name == "batch" else seq if dim.name == "seq" else other + 2 * len(sizes)
                low = dim.min if index else max(dim.min, 2)
                want = 0 if index == 1 and dim.min == 0 else want  # a dim that may be empty is, once
                want = -(-want // dim.multiple) * dim.multiple
                sizes[dim.name] = min(max(want, low), dim.max or want)
                while (
                    not index and sizes[dim.name] in list(sizes.values())[:-1] and sizes[dim.name] < (dim.max or 2**31)
                ):
                    sizes[dim.name] += dim.multiple  # two dims clipped to one minimum: distinct for tracing
                if index == 2 and dim.natural is not None:
                    sizes[dim.name] = dim.natural
            for dim in self.dims.values():
                if dim.sum_of:
                    sizes[dim.name] = sum(sizes[part] for part in dim.sum_of)
            cases.append(sizes)
        return cases

    def trace_sizes(self) -> dict[str, int]:
        sizes = self.cases(1)[0]
        values = list(sizes.values())
        if any(v < 2 for v in values) or len(set(values)) != len(values):
            raise InputError(f"cannot pick distinct tracing sizes >= 2 for dims {sizes}; widen the dim ranges")
        return sizes

    def example(self, sizes: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded example tensors for one size assignment."""
        generator = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.inputs:
            shape = [d if isinstance(d, int) else sizes[d] for d in spec.shape]
            dtype = DTYPES[spec.dtype]
            if spec.kind == "mask":
                value = torch.ones(shape, dtype=dtype)
                if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 1:
                    value[-1, shape[-1] // 2 + 1 :] = 0
            elif spec.kind == "segments":
                value = torch.zeros(shape, dtype=dtype)
                if len(shape) == 2:
                    value[1::2, shape[-1] // 2 :] = min(1, spec.high - 1)
            elif spec.kind == "index" or not dtype.is_floating_point:
                value = torch.randint(spec.low, spec.high, shape, generator=generator, dtype=torch.int64).to(dtype)
            else:
                value = torch.randn(shape, generator=generator).to(dtype)
            out[spec.name] = value
        return out

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """``torch.export`` dynamic-shape spec: one shared ``Dim`` per dim name (a dim with a ``multiple``:
        that multiple of a ``Dim`` counting the units, ``height = 8 * height_units``)."""
        dims = {d.name: _export_dim(d) for d in self.dims.values()}
        return {
            spec.name: {axis: dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)}
            for spec in self.inputs
        }

    def in_dtype(self, dtype: torch.dtype) -> InputSignature:
        """The signature with its float inputs in ``dtype`` (integer and bool inputs as they are)."""
        name = next(k for k, v in DTYPES.items() if v == dtype)
        inputs = tuple(
            dataclasses.replace(i, dtype=name) if DTYPES[i.dtype].is_floating_point else i for i in self.inputs
        )
        return InputSignature(inputs, self.dims)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [dataclasses.asdict(i) | {"shape": list(i.shape)} for i in self.inputs],
            "dims": {k: dataclasses.asdict(v) for k, v in self.dims.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputSignature:
        inputs = tuple(TensorInput(**(dict(i) | {"shape": tuple(i["shape"])})) for i in data["inputs"])
        dims = {k: DimSpec(**(dict(v) | {"sum_of": tuple(v.get("sum_of", ()))})) for k, v in data["dims"].items()}
        return cls(inputs, dims)


def _export_dim(dim: DimSpec) -> Any:
    if dim.sum_of:
        return torch.export.Dim.AUTO
    step = dim.multiple
    name = f"{dim.name}_units" if step > 1 else dim.name
    low, high = -(-dim.min // step), dim.max // step if dim.max else None
    base = torch.export.Dim(name, min=low, max=high) if high else torch.export.Dim(name, min=low)
    return base * step if step > 1 else base


def with_defaults(specs: Sequence[TensorInput], arrays: Mapping[str, Any]) -> Mapping[str, Any]:
    """``arrays`` (input name → array) with each input of ``specs`` that has a default and is left out
    filled with it, shaped by the named dims of the inputs given; one whose dims no given input has
    stays left out (the caller reports it missing)."""
    absent = [s for s in specs if s.name not in arrays and s.default is not None]
    if not absent:
        return arrays
    sizes: dict[str | int, int] = {}
    for spec in specs:
        shape = np.shape(arrays[spec.name]) if spec.name in arrays else ()
        if len(shape) == len(spec.shape):
            for size, dim in zip(shape, spec.shape, strict=True):
                sizes.setdefault(dim, int(size))
    filled = dict(arrays)
    for spec in absent:
        if all(isinstance(d, int) or d in sizes for d in spec.shape):
            filled[spec.name] = np.full([d if isinstance(d, int) else sizes[d] for d in spec.shape], spec.default)
    return filled


_RANGE = re.compile(r"^(?P<name>[A-Za-z_]\w*)(=(?P<min>\d+)\.\.(?P<max>\d+)?)?$")


def parse_inputs(texts: Sequence[str]) -> InputSignature:
    """Parse ``--input`` values (see the module docstring).

    Raises:
        InputError: naming the malformed value and what was expected.
    """
    inputs = []
    dims: dict[str, DimSpec] = {}
    for text in texts:
        parts = text.split(":")
        if len(parts) not in (3, 4) or not parts[0]:
            raise InputError(f"--input {text!r}: expected name:dims:dtype[:low..high], e.g. input_ids:batch,seq:int64")
        name, dim_text, dtype = parts[:3]
        if dtype not in DTYPES:
            raise InputError(f"--input {text!r}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        shape: list[int | str] = []
        for token in dim_text.split(",") if dim_text else []:
            token = token.strip()
            if token.isdigit():
                shape.append(int(token))
                continue
            match = _RANGE.match(token)
            if not match:
                raise InputError(f"--input {text!r}: dim {token!r} is neither an integer nor name[=min..max]")
            dim = DimSpec(match["name"], int(match["min"] or 1), int(match["max"]) if match["max"] else None)
            if dim.name in dims and match["min"] and dims[dim.name] != dim:
                raise InputError(f"--input {text!r}: dim {dim.name!r} has two different ranges")
            dims.setdefault(dim.name, dim)
            shape.append(dim.name)
        low, high = 0, 2
        kind = "float" if DTYPES[dtype].is_floating_point else "index"
        if len(parts) == 4:
            match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", parts[3])
            if not match or int(match[1]) >= int(match[2]):
                raise InputError(f"--input {text!r}: value range {parts[3]!r} is not low..high with low < high")
            low, high = int(match[1]), int(match[2])
        if name == "attention_mask" and len(parts) == 3:
            kind = "mask"
        inputs.append(TensorInput(name, tuple(shape), dtype, kind, low, high))
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise InputError(f"--input names repeat: {names}")
    return InputSignature(tuple(inputs), dims)


def from_transformers(model: Any) -> InputSignature | None:
    """The signature of a ``transformers.PreTrainedModel`` from its config, or None if unknown."""
    import inspect

    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    params = inspect.signature(model.forward).parameters
    if config is None or main is None:
        return None
    if main == "input_ids":
        seq_max = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        dims = {"batch": DimSpec("batch"), "seq": DimSpec("seq", 1, seq_max)}
        vocab = getattr(config, "vocab_size", None) or 2
        inputs = [TensorInput("input_ids", ("batch", "seq"), "int64", "index", 0, vocab)]
        if "attention_mask" in params:
            inputs.append(TensorInput("attention_mask", ("batch", "seq"), "int64", "mask"))
        types = getattr(config, "type_vocab_size", None) or 0
        if "token_type_ids" in params and types > 1:  # BERT-like segments; a call may leave them out
            inputs.append(TensorInput("token_type_ids", ("batch", "seq"), "int64", "segments", 0, types, default=0))
        return InputSignature(tuple(inputs), dims)
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        ranges = vision.hf_dims(model, height, width)[0]
        dims = {"batch": DimSpec("batch")} | {
            d: DimSpec(d, low, high, multiple=m, natural=n) for d, (low, high, m, n) in _natural(ranges, height, width)
        }
        sides = tuple(d if d in dims else int(s) for d, s in (("height", height), ("width", width)))
        spec = TensorInput("pixel_values", ("batch", channels, *sides), "float32")
        return InputSignature((spec,), dims)
    return None


def _natural(ranges: Mapping[str, tuple[int, int, int]], height: int, width: int) -> list[tuple[str, tuple]]:
    """``(dim, (min, max, multiple, natural))`` of image-side ``ranges``: ``natural`` is the model's own side."""
    own = {"height": int(height), "width": int(width)}
    fits = {d: low <= own[d] <= high and own[d] % m == 0 for d, (low, high, m) in ranges.items()}
    return [(d, (*bounds, own[d] if fits[d] else None)) for d, bounds in ranges.items()]


def from_program(program: Any) -> InputSignature:
    """The signature of an exported program, from its placeholders' fake values and ranges."""
    names = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    dims: dict[str, DimSpec] = {}
    inputs = []
    for name in names:
        val = nodes[name].meta["val"]
        shape: list[int | str] = []
        for d in val.shape:
            if isinstance(d, int):
                shape.append(d)
                continue
            symbol = str(d)
            if symbol not in ranges:
                raise InputError(f"input {name!r} has a derived dynamic dim {symbol!r}; pass --input to describe it")
            r = ranges[symbol]
            upper = None if str(r.upper) in ("int_oo", "oo") else int(r.upper)
            dims.setdefault(symbol, DimSpec(symbol, int(r.lower), upper))
            shape.append(symbol)
        dtype = str(val.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise InputError(f"input {name!r} has unsupported dtype {dtype}")
        kind = "float" if val.dtype.is_floating_point else "index"
        inputs.append(TensorInput(name, tuple(shape), dtype, kind))
    return InputSignature(tuple(inputs), dims)


def from_timm(model: Any, kwargs: Mapping[str, Any] | None = None) -> tuple[InputSignature, str]:
    """``(signature, note)`` of a timm model: ``x:batch,C,H,W`` with its patch embedding's image size if it
    has one, else the ``pretrained_cfg`` (``default_cfg``) input size, with ``img_size``/``in_chans``
    arguments applied; ``H``/``W`` are the dims ``height``/``width`` where the model takes other sizes, and
    the note says whether it does (:func:`peftc.loaders.vision.timm_dims`)."""
    kwargs = kwargs or {}
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    size = kwargs.get("img_size") or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = int(kwargs.get("in_chans", channels))
    ranges, note = vision.timm_dims(model, int(height), int(width))
    dims = {"batch": DimSpec("batch")} | {
        d: DimSpec(d, low, high, multiple=m, natural=n) for d, (low, high, m, n) in _natural(ranges, height, width)
    }
    sides = tuple(d if d in dims else int(s) for d, s in (("height", height), ("width", width)))
    spec = TensorInput("x", ("batch", channels, *sides), "float32")
    return InputSignature((spec,), dims), note
