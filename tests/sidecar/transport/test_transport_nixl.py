"""NIXL transport between two processes: bit-exact pulls, bounded memory, failures that end cleanly."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("nixl", reason="NIXL is installed by make install")

from kvpool.sidecar import realkv
from kvpool.sidecar.nixl_peer import SourceProcess
from kvpool.sidecar.transport_nixl import (
    ChunkLocation,
    NixlSink,
    NixlSource,
    TransportError,
    TransportTimeout,
)

from .conftest import free_port

MiB = 1 << 20


@pytest.fixture
def sink():
    with NixlSink(slots=2, slot_bytes=4 * MiB) as s:
        yield s


@pytest.fixture(scope="module")
def source():
    """The prefill side in a process of its own, with NIXL's metadata listener on."""
    port = free_port()
    with SourceProcess(slots=4, slot_bytes=4 * MiB, listen_port=port) as proc:
        proc.port = port
        yield proc


def test_pulled_chunks_are_bit_exact_real_kv(real_kv, source, sink):
    """Per layer, the raw KV bytes published by one process arrive unchanged in another;
    the metadata went over a channel of ours (here a pipe; in the sidecar, gRPC)."""
    keys, values = real_kv
    chunks = [realkv.raw_bytes(keys[i:i + 1], values[i:i + 1]) for i in range(len(keys))]
    assert sink.add_peer(source.metadata) == source.name
    for chunk in chunks:
        loc = source.publish(chunk)
        assert loc.agent == source.name and loc.mem_type == "DRAM"
        assert sink.pull(ChunkLocation.from_bytes(loc.to_bytes())) == chunk
    assert source.wait_idle(10), "every READ releases its slot on the source"


def test_metadata_through_nixl_listener(source):
    payload = os.urandom(3 * MiB + 17)
    with NixlSink(slots=1, slot_bytes=4 * MiB, listen_port=free_port()) as sink:
        sink.fetch_peer(source.name, "127.0.0.1", source.port, timeout=30)
        assert sink.pull(source.publish(payload)) == payload
    with NixlSink(slots=1, slot_bytes=MiB) as sink, pytest.raises(TransportError, match="listen"):
        sink.fetch_peer(source.name, "127.0.0.1", source.port)


def test_source_memory_is_bounded_and_pushes_back():
    with NixlSource(slots=2, slot_bytes=MiB, lease_s=60) as source, \
            NixlSink(slots=1, slot_bytes=MiB) as sink:
        sink.add_peer(source.metadata())
        first, second = source.publish(b"a" * 1000), source.publish(b"b" * 1000)
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout, match="all 2 slots held"):
            source.publish(b"c" * 1000, timeout=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert sink.pull(first) == b"a" * 1000
        third = source.publish(b"c" * 1000, timeout=5)
        assert third.slot == first.slot and third.generation == first.generation + 1
        assert sink.pull(second) == b"b" * 1000 and sink.pull(third) == b"c" * 1000
        assert source.wait_idle(5)
        with pytest.raises(ValueError, match="exceeds the slot size"):
            source.publish(b"x" * (MiB + 1))


def test_unread_chunk_is_reclaimed_when_its_lease_ends():
    with NixlSource(slots=1, slot_bytes=MiB, lease_s=0.2) as source:
        source.publish(b"never read")
        time.sleep(0.3)
        assert source.held() == 0 and source.reclaimed == 1
        source.publish(b"next", timeout=1)


def test_overwritten_slot_fails_the_checksum():
    with NixlSource(slots=1, slot_bytes=MiB, lease_s=0.05) as source, \
            NixlSink(slots=1, slot_bytes=MiB) as sink:
        sink.add_peer(source.metadata())
        stale = source.publish(b"old" * 100)
        time.sleep(0.1)
        source.publish(b"new" * 100, timeout=1)
        with pytest.raises(TransportError, match="CRC-32 mismatch"):
            sink.pull(stale)


def test_dead_then_restarted_source(sink):
    """A pull from a killed source fails within its deadline; the source restarted at the
    same place is a new agent, and locations of the old one are refused."""
    with SourceProcess(slots=1, slot_bytes=4 * MiB) as old:
        sink.add_peer(old.metadata)
        stale = old.publish(os.urandom(4 * MiB))
        old.kill()
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            sink.pull(stale, timeout=3)
        assert time.monotonic() - t0 < 5
    with SourceProcess(slots=1, slot_bytes=MiB) as new:
        assert new.name != old.name
        sink.add_peer(new.metadata)
        sink.remove_peer(old.name)
        with pytest.raises(TransportError, match="unknown peer"):
            sink.pull(stale)
        assert sink.pull(new.publish(b"after restart")) == b"after restart"


def test_malformed_location_is_a_clean_error():
    with pytest.raises(TransportError, match="malformed"):
        ChunkLocation.from_bytes(b"{not json")
