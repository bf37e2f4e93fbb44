"""Bounded, typed reading of the files a user hands peftc (adapter configs and weights, state dicts).

* Only regular files are read: a directory, FIFO, socket or device (a symlink to ``/dev/zero``)
  is refused before it is opened, and the file is opened non-blocking and checked again, so a
  FIFO swapped in between cannot block.
* JSON is capped in size (:data:`JSON_LIMIT`) and nesting depth (:data:`JSON_DEPTH`).
* A safetensors file's header is read and validated first: its length, every dtype, shape and
  byte range (``prod(shape) × itemsize == end - start``, ranges contiguous and covering the data
  exactly). Only then is the data read, once, into one buffer per tensor that the tensor views (no
  second copy), and hashed from the same bytes, so the hash is of what was used. A caller loading a
  model passes a ``sink`` that copies each tensor into the model as it is read, so the file's bytes
  are never held beside the model's (``benchmarks/rss.py --bigfile``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from peftc.errors import InputError

JSON_LIMIT = 1 << 20
"""Largest JSON config read (1 MiB; PEFT configs are a few KiB)."""
JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a JSON config."""
HEADER_LIMIT = 100 << 20
"""Largest safetensors header (the format's own limit)."""

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def check_regular(path: str | os.PathLike[str], limit: int | None = None, what: str = "file") -> int:
    """The size of ``path`` if it is a regular file of at most ``limit`` bytes (symlinks followed).

    Raises:
        InputError: missing, not a regular file (naming what it is), or too large.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: {_kind(info.st_mode)}, not a regular file; give the file itself")
    if limit is not None and info.st_size > limit:
        raise InputError(f"{path}: {info.st_size} bytes; a {what} is at most {limit} bytes")
    return info.st_size


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open ``path`` for reading if it is a regular file (symlinks to regular files are followed).

    Raises:
        InputError: missing, unreadable, or not a regular file (naming what it is).
    """
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{path}: {_kind(mode)}, not a regular file; give the file itself")
        os.set_blocking(fd, True)
        yield f


def read_bytes(path: str | os.PathLike[str], limit: int | None = None, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refused above ``limit`` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise InputError(f"{path}: {size} bytes; a {what} is at most {limit} bytes")
        return _read_exactly(f, size, path)


def _read_exactly(f: IO[bytes], size: int, path: Any) -> bytes:
    try:
        data = f.read(size)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    if len(data) != size:
        raise InputError(f"{path}: changed while being read ({len(data)} of {size} bytes)")
    return data


def parse_json(raw: bytes, where: Any, *, depth: int = JSON_DEPTH) -> Any:
    """Decode ``raw`` as JSON nested at most ``depth`` deep.

    Raises:
        InputError: invalid UTF-8 or JSON, or nested too deep, naming ``where``.
    """
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except RecursionError as e:
        raise InputError(f"{where}: JSON nested too deeply (at most {depth} levels)") from e
    level, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > depth:
            raise InputError(f"{where}: JSON nested too deeply (at most {depth} levels)")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return value


def read_json(path: str | os.PathLike[str], *, limit: int = JSON_LIMIT, depth: int = JSON_DEPTH) -> tuple[Any, bytes]:
    """``(value, raw bytes)`` of the JSON file ``path``, bounded in size and depth."""
    raw = read_bytes(path, limit, "JSON file")
    return parse_json(raw, path, depth=depth), raw


def read_safetensors(
    path: str | os.PathLike[str],
    sink: Callable[[str, Any], None] | None = None,
    check: Callable[[Mapping[str, tuple[str, tuple[int, ...]]]], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """``(tensors, sha256)`` of a safetensors file, header validated before its data is read.

    Args:
        sink: called with each ``(key, tensor)`` as it is read, instead of keeping the tensors (the dict
            returned is then empty): a caller that copies each into its model holds one tensor at a time,
            not the whole file besides the model. The tensor's buffer is not reused after the call.
        check: called with ``{key: (dtype, shape)}`` once the header is validated, before any data is read
            (it raises to stop there).

    Raises:
        InputError: not a regular file, or a header that is malformed or disagrees with the file size,
            naming the file and the key.
    """
    import torch

    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise InputError(f"{path}: not a valid safetensors file ({size} bytes, shorter than its header length)")
        head = _read_exactly(f, 8, path)
        length = int.from_bytes(head, "little")
        if length > min(HEADER_LIMIT, size - 8):
            raise InputError(f"{path}: not a valid safetensors file (header of {length} bytes in a {size}-byte file)")
        header = _read_exactly(f, length, path)
        try:
            described = parse_json(header, "header", depth=3)
        except InputError as e:
            raise InputError(f"{path}: not a valid safetensors file ({e})") from e
        entries = _check_header(path, described, size - 8 - length)
        if check is not None:
            check({key: (dtype, shape) for key, (dtype, shape, _, _) in entries.items()})
        digest = hashlib.sha256(head)
        digest.update(header)
        tensors = {}
        for key, (dtype, shape, start, end) in sorted(entries.items(), key=lambda item: item[1][2]):
            # One buffer per tensor, in file order: aligned, hashed as read, and no tensor shares storage.
            data = bytearray(end - start)
            if f.readinto(data) != len(data):
                raise InputError(f"{path}: changed while being read")
            digest.update(data)
            torch_dtype = getattr(torch, dtype)
            tensor = (
                torch.frombuffer(data, dtype=torch_dtype).reshape(shape)
                if data
                else torch.empty(shape, dtype=torch_dtype)
            )
            if sink is None:
                tensors[key] = tensor
            else:
                sink(key, tensor)
    return dict(sorted(tensors.items())), digest.hexdigest()


def _check_header(path: Any, header: Any, data_size: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    import torch

    bad = f"{path}: not a valid safetensors file"
    if not isinstance(header, dict):
        raise InputError(f"{bad} (the header is not a JSON object)")
    entries = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, Mapping) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise InputError(f"{bad} ({key}: expected dtype, shape and data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES or not hasattr(torch, _DTYPES[dtype]):
            raise InputError(f"{bad} ({key}: unknown dtype {dtype!r})")
        ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        if not ints or not all(type(n) is int and n >= 0 for n in [*shape, *offsets]):
            raise InputError(f"{bad} ({key}: shape and data_offsets must be non-negative integers)")
        itemsize = getattr(torch, _DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise InputError(
                f"{bad} ({key}: {dtype} {shape} needs {math.prod(shape) * itemsize} bytes, the header gives "
                f"{offsets[1] - offsets[0]})"
            )
        entries[key] = (_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    end = 0
    for key, (_, _, start, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if start != end:
            raise InputError(f"{bad} ({key}: data at byte {start}, expected {end}; ranges overlap or leave gaps)")
        end = stop
    if end != data_size:
        raise InputError(f"{bad} (the header describes {end} bytes of data, the file holds {data_size})")
    return entries


def check_finite(tensors: Mapping[str, Any], where: Any) -> None:
    """Raise naming the first key of ``tensors`` holding NaN or ±Inf."""
    import torch

    for key, tensor in tensors.items():
        values = tensor.float() if tensor.is_floating_point() and tensor.itemsize == 1 else tensor
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            what = "NaN" if bool(torch.isnan(values).any()) else "Inf"
            raise InputError(f"{where}:{key}: holds {what}; adapter tensors must be finite")
