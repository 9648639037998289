"""The Peer stream's own (de)serialization: the same bytes as protobuf's, both ways."""

from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError

from kvpool.sidecar import peerwire
from kvpool.sidecar.proto import sidecar_pb2 as pb

KEY = pb.ChunkKey(layer=3, token_start=256, token_end=512, prefix_hash=b"\x01" * 16)


def proto_chunk(payload: bytes, **extra) -> pb.WireChunk:
    return pb.WireChunk(key=KEY, level="lossless", payload=payload, crc32c=0xDEADBEEF,
                        raw_bytes=3 << 20, **extra)  # fmt: skip


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300_000, 4 << 20])
def test_chunk_reads_as_protobuf_wrote_it_and_back(size: int) -> None:
    payload = os.urandom(size)
    sent = pb.PeerMessage(chunk=proto_chunk(payload))
    data = sent.SerializeToString()
    message = peerwire.parse(data)
    assert message.kind == "chunk" and message.chunk.payload == payload
    # the payload is read in place: a read-only view of the received bytes, not a copy
    assert message.chunk.payload.readonly and message.chunk.payload.obj is data
    assert message.chunk.fields() == proto_chunk(b"")
    back = pb.PeerMessage.FromString(peerwire.serialize(message))
    assert back == sent


def test_header_end_and_nixl_chunk_round_trip() -> None:
    for sent in (pb.PeerMessage(header=pb.TransferHeader(transfer_id="t", model="m")),
                 pb.PeerMessage(end=pb.TransferEnd(num_tokens=9, num_layers=2, chunks=4)),
                 pb.PeerMessage(chunk=proto_chunk(b"", nixl_location=b"where"))):  # fmt: skip
        message = peerwire.parse(sent.SerializeToString())
        assert message.kind == sent.WhichOneof("item")
        assert pb.PeerMessage.FromString(peerwire.serialize(message)) == sent


def test_fields_in_any_order_and_repeated_payload() -> None:
    # protobuf allows any field order and a repeated field (the last one wins)
    first = pb.WireChunk(payload=b"old").SerializeToString()
    rest = proto_chunk(b"new").SerializeToString()
    inner = first + rest
    data = b"\x12" + peerwire._varint(len(inner)) + inner
    assert pb.PeerMessage.FromString(data).chunk.payload == b"new"
    assert peerwire.parse(data).chunk.payload == b"new"


def test_malformed_bytes_raise_decode_error() -> None:
    data = pb.PeerMessage(chunk=proto_chunk(os.urandom(1000))).SerializeToString()
    with pytest.raises(DecodeError):
        peerwire.parse(data[:-10])
    assert peerwire.parse(b"").kind == ""
