"""Writing an ONNX model as one file without holding a serialized copy of its weights in memory.

``onnx_ir.save`` builds the whole ``ModelProto`` (a copy of every initializer's bytes) and then its
serialization (a second copy) before writing: about three times the weights at its peak, the largest
transient of a compile. :func:`save` writes the same bytes, byte for byte, while holding only the
model without its weights: each initializer's ``raw_data`` is left empty in the proto that is
serialized, and the file is assembled from the protobuf encoding around it, with each tensor's bytes
written straight from the tensor (``tofile``).

Protobuf serializes a message's fields in field-number order, so the encoding of a model is
``[fields before graph] graph [fields after graph]``, of its graph ``[node, name] initializer…
[the rest]`` and of a tensor ``[fields before raw_data] raw_data [fields after raw_data]``; the
lengths in front of the graph and of each initializer are computed with the real data sizes. The
test compares the result with ``onnx_ir.save``'s bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

_GRAPH = 7
"""``ModelProto.graph``."""
_INITIALIZER = 5
"""``GraphProto.initializer``."""
_RAW_DATA = 9
"""``TensorProto.raw_data``."""


def save(model: Any, path: Path) -> None:
    """Write ``model`` (an ``onnx_ir.Model``) to ``path`` as ``onnx_ir.save(model, path)`` does (one file,
    no external data), with its initializers' bytes streamed from the tensors."""
    import onnx_ir

    streamed = [v for v in model.graph.initializers.values() if _streamable(v.const_value)]
    originals = {v.name: v.const_value for v in streamed}
    for value in streamed:
        value.const_value = _Header(value.const_value)
    try:
        proto = onnx_ir.serde.serialize_model(model)
    finally:
        for value in streamed:
            value.const_value = originals[value.name]
    model_head, model_tail = _split(proto, "graph")
    graph = proto.graph
    tensors = list(graph.initializer)
    graph.ClearField("initializer")
    graph_head, graph_tail = _split_graph(graph)
    parts = [_initializer(t, originals.get(t.name)) for t in tensors]
    size = len(graph_head) + len(graph_tail) + sum(_field_size(_INITIALIZER, length) for length, _ in parts)
    with open(path, "wb") as file:
        file.write(model_head + _key(_GRAPH) + _varint(size) + graph_head)
        for length, write in parts:
            file.write(_key(_INITIALIZER) + _varint(length))
            write(file)
        file.write(graph_tail + model_tail)


class _Header:
    """A tensor's name, type and shape without its data: what the serialized proto holds for it."""

    def __init__(self, tensor: Any) -> None:
        self.name, self.doc_string = tensor.name, tensor.doc_string
        self.dtype, self.shape, self.metadata_props = tensor.dtype, tensor.shape, tensor.metadata_props

    def tobytes(self) -> bytes:
        return b""


def _streamable(tensor: Any) -> bool:
    """Dense tensors held in memory (not a proto's, an external file's or strings)."""
    import onnx_ir

    kinds = (onnx_ir.serde.TensorProtoTensor, onnx_ir.ExternalTensor, onnx_ir.StringTensor)
    return tensor is not None and hasattr(tensor, "tofile") and not isinstance(tensor, kinds)


def _initializer(proto: Any, tensor: Any) -> tuple[int, Any]:
    """``(encoded length, writer)`` of one initializer: its proto as is, or, for a streamed ``tensor``,
    the proto's fields around ``raw_data`` and the tensor's bytes between them."""
    if tensor is None:
        encoded = proto.SerializeToString()
        return len(encoded), lambda file: file.write(encoded)
    proto.ClearField("raw_data")
    head, tail = _split_before(proto, _RAW_DATA)
    nbytes = int(tensor.nbytes)

    def write(file: BinaryIO) -> None:
        file.write(head + _key(_RAW_DATA) + _varint(nbytes))
        start = file.tell()
        tensor.tofile(file)
        file.flush()
        if file.tell() - start != nbytes:
            raise AssertionError(f"initializer {proto.name}: wrote {file.tell() - start} bytes, expected {nbytes}")
        file.write(tail)

    return len(head) + _field_size(_RAW_DATA, nbytes) + len(tail), write


def _split(proto: Any, field: str) -> tuple[bytes, bytes]:
    """The encoding of ``proto`` before and after its message field ``field``, which is left out."""
    inner = getattr(proto, field)
    number = proto.DESCRIPTOR.fields_by_name[field].number
    kept = type(inner)()
    kept.CopyFrom(inner)
    proto.ClearField(field)
    try:
        return _split_before(proto, number)
    finally:
        getattr(proto, field).CopyFrom(kept)


def _split_before(proto: Any, number: int) -> tuple[bytes, bytes]:
    """The encoding of ``proto`` (which lacks field ``number``) cut where that field would go."""
    encoded = proto.SerializeToString()
    before = type(proto)()
    before.CopyFrom(proto)
    for descriptor, _ in before.ListFields():
        if descriptor.number > number:
            before.ClearField(descriptor.name)
    head = before.SerializeToString()
    if not encoded.startswith(head):
        raise AssertionError(f"{type(proto).__name__} does not serialize its fields in field-number order")
    return head, encoded[len(head) :]


def _split_graph(graph: Any) -> tuple[bytes, bytes]:
    """The graph's encoding (without initializers) before and after where they go."""
    return _split_before(graph, _INITIALIZER)


def _key(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _field_size(number: int, length: int) -> int:
    return len(_key(number)) + len(_varint(length)) + length


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
