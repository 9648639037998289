"""The Peer stream's messages as the sidecar holds them, and their bytes on the wire.

A Peer stream (``Pull``, ``Push`` in sidecar.proto) carries ``PeerMessage`` protobufs whose
chunk payloads are large (up to one layer of a prefill step's KV). Protobuf messages copy
a bytes field on every construction, wrapping, serialization, parse and read, and on the
receiving side those copies (into fresh memory) cost more CPU than the socket itself. So
the sidecar keeps a chunk as a :class:`Chunk` (its payload a plain ``bytes``) and does the
Peer service's (de)serialization here: a chunk goes out as one join of its small fields'
protobuf bytes and its payload, and comes in with its payload sliced out of the message
once. The bytes are exactly the protobuf encoding of the message (the payload field last,
which protobuf allows), so a peer built from sidecar.proto by any protobuf implementation
reads and writes the same stream; anything but a lone chunk takes the protobuf parser.

:class:`PeerStub` and :func:`handler` are the Peer service's client and server sides with
these (de)serializers; everything else of the service is as generated from the proto.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from kvpool.sidecar.proto import sidecar_pb2 as pb

SERVICE = "kvpool.sidecar.v1.Peer"

_CHUNK_TAG = b"\x12"  # PeerMessage.chunk: field 2, length-delimited
_PAYLOAD_TAG = 3 << 3 | 2  # WireChunk.payload: field 3, length-delimited


@dataclass(slots=True)
class Chunk:
    """One encoded chunk (the fields of ``WireChunk``), its payload kept out of protobuf."""

    key: pb.ChunkKey
    level: str
    payload: bytes | memoryview
    """Plain bytes, or a read-only view of a received message's."""
    crc32c: int
    raw_bytes: int
    nixl_location: bytes = b""

    def fields(self) -> pb.WireChunk:
        """Every field but the payload, as a protobuf message."""
        return pb.WireChunk(key=self.key, level=self.level, crc32c=self.crc32c,
                            raw_bytes=self.raw_bytes, nixl_location=self.nixl_location)  # fmt: skip

    @classmethod
    def from_proto(cls, chunk: pb.WireChunk, payload: bytes | None = None) -> Chunk:
        return cls(key=chunk.key, level=chunk.level,
                   payload=chunk.payload if payload is None else payload,
                   crc32c=chunk.crc32c, raw_bytes=chunk.raw_bytes,
                   nixl_location=chunk.nixl_location)  # fmt: skip


@dataclass(slots=True)
class Message:
    """One message of a Peer stream: exactly one of header, chunk, end."""

    header: pb.TransferHeader | None = None
    chunk: Chunk | None = None
    end: pb.TransferEnd | None = None

    @property
    def kind(self) -> str:
        """``header``, ``chunk``, ``end``, or ``""`` for an empty message."""
        if self.chunk is not None:
            return "chunk"
        if self.header is not None:
            return "header"
        return "end" if self.end is not None else ""

    @classmethod
    def from_proto(cls, message: pb.PeerMessage) -> Message:
        kind = message.WhichOneof("item")
        if kind == "chunk":
            return cls(chunk=Chunk.from_proto(message.chunk))
        if kind == "header":
            return cls(header=message.header)
        return cls(end=message.end) if kind == "end" else cls()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError when truncated
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def serialize(message: Message) -> bytes:
    """``message`` as the bytes of a ``PeerMessage``; a chunk's payload is copied once."""
    chunk = message.chunk
    if chunk is None:
        if message.header is not None:
            return pb.PeerMessage(header=message.header).SerializeToString()
        if message.end is not None:
            return pb.PeerMessage(end=message.end).SerializeToString()
        return b""
    fields = chunk.fields().SerializeToString()
    payload = chunk.payload
    if not payload:
        return b"".join((_CHUNK_TAG, _varint(len(fields)), fields))
    size = _varint(len(payload))
    inner = len(fields) + 1 + len(size) + len(payload)
    return b"".join((_CHUNK_TAG, _varint(inner), fields, bytes((_PAYLOAD_TAG,)), size, payload))


def parse(data: bytes) -> Message:
    """The inverse of :func:`serialize`, for any valid ``PeerMessage`` bytes (DecodeError
    when they are not one)."""
    if data[:1] == _CHUNK_TAG:
        try:
            length, start = _read_varint(data, 1)
            if start + length == len(data):  # a lone chunk: the fast path
                return Message(chunk=_parse_chunk(data, start))
        except (IndexError, DecodeError):
            pass  # let the protobuf parser say what is wrong
    return Message.from_proto(pb.PeerMessage.FromString(data))


def _parse_chunk(data: bytes, pos: int) -> Chunk:
    """The WireChunk in ``data[pos:]``: its small fields through protobuf, its payload
    sliced out (the last one wins, as in protobuf)."""
    end = len(data)
    others: list[bytes] = []
    payload = (0, 0)
    while pos < end:
        field_start = pos
        tag, pos = _read_varint(data, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            body, pos = pos, pos + size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise DecodeError(f"wire type {wire}")
        if pos > end:
            raise DecodeError("truncated chunk")
        if tag == _PAYLOAD_TAG:
            payload = (body, pos)
        else:
            others.append(data[field_start:pos])
    fields = pb.WireChunk.FromString(b"".join(others))
    # A view, not a copy: a slice of bytes copies it, which for megabytes of payload (into
    # fresh pages) cost more than the rest of the receive path together.
    return Chunk.from_proto(fields, payload=memoryview(data)[payload[0]:payload[1]])


class PeerStub:
    """Client of the Peer service whose stream messages are :class:`Message`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Pull = channel.unary_stream(
            f"/{SERVICE}/Pull", request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=parse)  # fmt: skip
        self.Push = channel.stream_unary(
            f"/{SERVICE}/Push", request_serializer=serialize,
            response_deserializer=pb.PushReply.FromString)  # fmt: skip
        self.Hello = channel.unary_unary(
            f"/{SERVICE}/Hello", request_serializer=pb.HelloRequest.SerializeToString,
            response_deserializer=pb.HelloReply.FromString)  # fmt: skip


def handler(servicer) -> grpc.GenericRpcHandler:
    """The Peer service of ``servicer`` (its ``Pull``, ``Push`` and ``Hello``) for
    ``add_generic_rpc_handlers``."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=pb.PullRequest.FromString,
            response_serializer=serialize),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=parse,
            response_serializer=pb.PushReply.SerializeToString),
        "Hello": grpc.unary_unary_rpc_method_handler(
            servicer.Hello, request_deserializer=pb.HelloRequest.FromString,
            response_serializer=pb.HelloReply.SerializeToString),
    })  # fmt: skip
