"""Shared memory between the decode sidecar and its connector, over the real unix socket:
chunks handed over as descriptors are the bytes the socket would carry; a connector that
does not see the sidecar's directory gets bytes; segments go after release, failure and
lease; stale files of a dead sidecar are swept; bad descriptors are clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import grpc
import pytest
import pytest_asyncio
import torch

from kvpool.sidecar import codec, shm
from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.proto import sidecar_pb2_grpc as pb_grpc
from kvpool.sidecar.server import Sidecar, SidecarConfig
from tests.sidecar.test_sidecar_grpc import (
    LAYERS,
    MODEL,
    load_all,
    make_chunk,
    put_transfer,
    until,
)

pytestmark = pytest.mark.asyncio

LEVELS = [lv for lv in ("raw", "lossless", "default") if lv in codec.levels()]


@contextlib.asynccontextmanager
async def sidecars(tmp_path, prefill_shm: str, decode_shm: str):
    """A prefill and a decode sidecar with these shared-memory directories, each with a
    Local client (unix socket)."""
    made, channels = [], []
    try:
        for name, shm_dir in (("prefill", prefill_shm), ("decode", decode_shm)):
            s = Sidecar(SidecarConfig(local=f"unix://{tmp_path}/{name}.sock", lease_s=30,
                                      transfer_timeout_s=5, shm_dir=shm_dir))
            await s.start()
            made.append(s)
            channels.append(grpc.aio.insecure_channel(s.config.local))
        yield made, [pb_grpc.LocalStub(c) for c in channels]
    finally:
        for c in channels:
            await c.close()
        for s in made:
            await s.stop(grace=0)


@pytest_asyncio.fixture
async def sides(tmp_path):
    """A prefill sidecar without shared memory and a decode sidecar keeping decoded chunks
    in ``tmp_path/shm``."""
    (tmp_path / "shm").mkdir()
    async with sidecars(tmp_path, "off", str(tmp_path / "shm")) as made:
        yield made


async def load_shared(local, request, directory):
    """Load ``request`` asking for descriptors: the chunks (copied out of the mapping),
    the end, and how many came as descriptors."""
    reader = shm.SegmentReader(directory)
    got, end, shared = {}, None, 0
    try:
        async for reply in local.Load(request):
            kind = reply.WhichOneof("item")
            if kind == "end":
                end = reply.end
            elif kind == "shared":
                shared += 1
                k, v = reader.planes(reply.shared)
                got[reply.shared.key.layer, reply.shared.key.token_start] = (k.clone(), v.clone())
            else:
                c = reply.chunk
                got[c.key.layer, c.key.token_start] = codec.to_kvcache(c).keys[0], \
                    codec.to_kvcache(c).values[0]
    finally:
        reader.close()
    return got, end, shared


def segment_files(decode: Sidecar) -> list[str]:
    return sorted(p.name for p in decode.shm.directory.glob(f"kvpool-{decode.shm.instance}-*"))


async def pushed(p_local, decode, tid, level="raw", ranges=((0, 32), (32, 64))):
    sent = await put_transfer(p_local, tid, list(range(ranges[-1][1])), list(ranges),
                              level=level, push_to=decode.peer_address)
    await until(lambda: (t := decode.store.get(tid)) is not None and t.end is not None)
    return sent


@pytest.mark.parametrize("level", LEVELS)
async def test_descriptors_carry_the_same_bytes_as_the_socket(sides, level):
    (_prefill, decode), (p_local, d_local) = sides
    info = await d_local.Info(pb.InfoRequest())
    directory = shm.attach(info)
    assert directory == decode.shm.directory
    await pushed(p_local, decode, "shm", level)
    by_shm, end, shared = await load_shared(d_local, pb.LoadRequest(
        transfer_id="shm", model=MODEL, expect_push=True, shared_memory=True), directory)
    await pushed(p_local, decode, "bytes", level)
    by_bytes, _ = await load_all(d_local, pb.LoadRequest(
        transfer_id="bytes", model=MODEL, expect_push=True))
    assert shared == 2 * LAYERS and end.chunks == 2 * LAYERS
    assert by_shm.keys() == by_bytes.keys()
    for key, (k, v) in by_bytes.items():
        assert torch.equal(by_shm[key][0], k) and torch.equal(by_shm[key][1], v)
    assert decode.metrics.local_chunks.labels("shm")._value.get() == 2 * LAYERS


async def test_the_segment_lives_until_release(sides):
    (_prefill, decode), (p_local, d_local) = sides
    directory = shm.attach(await d_local.Info(pb.InfoRequest()))
    await pushed(p_local, decode, "t1")
    held = decode.shm.held_bytes
    assert held > 0 and len(segment_files(decode)) == 1
    await load_shared(d_local, pb.LoadRequest(transfer_id="t1", model=MODEL, expect_push=True,
                                              shared_memory=True), directory)
    assert decode.store.get("t1") is None
    assert len(segment_files(decode)) == 1, "the connector may still be reading it"
    reply = await d_local.Release(pb.ReleaseRequest(transfer_id="t1"))
    assert reply.bytes == held
    assert segment_files(decode) == [] and decode.shm.held_bytes == 0


async def test_a_pulled_transfer_keeps_its_segment_until_release(sides):
    """Decode pulls (nothing was pushed): the segment outlives the pull and the Load, so a
    connector that maps the regions only after reading every reply still finds them."""
    (prefill, decode), (p_local, d_local) = sides
    directory = shm.attach(await d_local.Info(pb.InfoRequest()))
    sent = await put_transfer(p_local, "tp", list(range(64)), [(0, 32), (32, 64)])
    descriptors = [r.shared async for r in d_local.Load(pb.LoadRequest(
        transfer_id="tp", model=MODEL, peer=prefill.peer_address, shared_memory=True))
        if r.WhichOneof("item") == "shared"]
    assert len(descriptors) == 2 * LAYERS
    await asyncio.sleep(0.2)  # the pull's own end, after the Load's
    reader = shm.SegmentReader(directory)
    try:
        for d in descriptors:
            k, v = reader.planes(d)
            want = sent[d.key.layer, d.key.token_start]
            assert torch.equal(k, want[0]) and torch.equal(v, want[1])
    finally:
        reader.close()
    await d_local.Release(pb.ReleaseRequest(transfer_id="tp"))
    assert segment_files(decode) == []


async def test_a_reader_without_the_directory_gets_bytes(sides, tmp_path):
    (_prefill, decode), (p_local, d_local) = sides
    info = await d_local.Info(pb.InfoRequest())
    elsewhere = tmp_path / "not-shared"
    elsewhere.mkdir()
    assert shm.attach(info, str(elsewhere)) is None, "the probe is not there"
    sent = await pushed(p_local, decode, "t2")
    assert segment_files(decode), "decoded into shared memory before anyone asked"
    got, end = await load_all(d_local, pb.LoadRequest(transfer_id="t2", model=MODEL,
                                                      expect_push=True))
    assert end.chunks == 2 * LAYERS
    assert all(torch.equal(got[k][0], sent[k][0]) for k in sent)
    assert segment_files(decode) == [] and decode.shm.held_bytes == 0
    # The next transfer is decoded as bytes: this connector does not map segments.
    await pushed(p_local, decode, "t3")
    await until(lambda: all(f.done() for f in decode.store.get("t3").decoded.values()))
    assert segment_files(decode) == []


async def test_a_sidecar_without_shared_memory_announces_none(sides):
    (prefill, _decode), (p_local, _d_local) = sides
    assert prefill.shm is None
    info = await p_local.Info(pb.InfoRequest())
    assert info.shm_dir == "" and shm.attach(info) is None


async def test_a_failed_transfer_lets_its_segment_go(sides):
    (_prefill, decode), (p_local, _d_local) = sides
    for layer in range(LAYERS):  # pushed, decoded on arrival, never sealed
        raw, _, _ = make_chunk(layer, 0, 32, list(range(32)))
        await p_local.Put(pb.PutRequest(transfer_id="t4", model=MODEL, level="raw",
                                        push_to=decode.peer_address, chunk=raw))
    await until(lambda: (t := decode.store.get("t4")) is not None and len(t.chunks) == LAYERS
                and all(f.done() for f in t.decoded.values()))
    assert segment_files(decode)
    decode.store.get("t4").fail("peer", "for the test")
    assert segment_files(decode) == [] and decode.shm.held_bytes == 0


async def test_an_unreleased_segment_goes_at_its_lease(sides):
    """A connector that dies after its load never calls Release."""
    (_prefill, decode), (p_local, d_local) = sides
    directory = shm.attach(await d_local.Info(pb.InfoRequest()))
    await pushed(p_local, decode, "t5")
    await load_shared(d_local, pb.LoadRequest(transfer_id="t5", model=MODEL, expect_push=True,
                                              shared_memory=True), directory)
    assert decode.shm.expire(now=time.monotonic()) == []
    assert len(decode.shm.expire(now=time.monotonic() + decode.shm.lease_s + 1)) == 1
    assert segment_files(decode) == [] and decode.shm.held_bytes == 0


async def test_chunks_past_the_bound_go_as_bytes(sides):
    (_prefill, decode), (p_local, d_local) = sides
    directory = shm.attach(await d_local.Info(pb.InfoRequest()))
    decode.shm.max_bytes = 3 * shm.PAGE * 8  # room for some chunks of 32 tokens, not all
    sent = await pushed(p_local, decode, "t6")
    got, _, shared = await load_shared(d_local, pb.LoadRequest(
        transfer_id="t6", model=MODEL, expect_push=True, shared_memory=True), directory)
    assert 0 < shared < 2 * LAYERS
    assert all(torch.equal(got[k][0], sent[k][0]) for k in sent)


async def test_a_restarted_sidecar_sweeps_dead_instances_only(sides, tmp_path):
    (_prefill, decode), _ = sides
    directory = decode.shm.directory
    for name in ("kvpool-0dead.lock", "kvpool-0dead-1", "kvpool-0dead.probe", "other-file"):
        (directory / name).write_bytes(b"x")
    alive = segment_files(decode) + [f"kvpool-{decode.shm.instance}.probe"]
    decode.shm.create("live")
    fresh = shm.SegmentDir(directory, 1 << 20, lease_s=30)
    try:
        left = {p.name for p in directory.iterdir()}
        assert fresh.removed_stale == 3
        assert "kvpool-0dead-1" not in left and "other-file" in left
        assert set(alive) <= left and decode.shm.get("live").name in left
        assert fresh.instance != decode.shm.instance
    finally:
        fresh.close()


async def test_bad_descriptors_are_clear_errors(sides):
    (_prefill, decode), (p_local, _d_local) = sides
    await pushed(p_local, decode, "t7")
    segment = decode.store.get("t7").segment
    reader = shm.SegmentReader(decode.shm.directory)
    good = pb.SharedChunk(key=pb.ChunkKey(layer=0, token_start=0, token_end=32),
                          dtype="bfloat16", width=192, segment=segment.name, offset=0,
                          length=2 * 32 * 192 * 2)
    try:
        assert reader.planes(good)[0].shape == (32, 192)
        cases = {
            "not a segment name": {"segment": "../../etc/passwd"},
            "cannot open segment": {"segment": "kvpool-0-99"},
            "past the end": {"offset": segment.size},
            "not page-aligned": {"offset": 100},
            "does not hold": {"length": good.length - 2},
            "unknown chunk dtype": {"dtype": "int3"},
        }
        for message, change in cases.items():
            bad = pb.SharedChunk()
            bad.CopyFrom(good)
            for field, value in change.items():
                setattr(bad, field, value)
            with pytest.raises(shm.ShmError, match=message):
                reader.planes(bad)
    finally:
        reader.close()
    assert os.path.exists(segment.path)


async def test_a_put_through_the_put_buffer_holds_the_same_chunk(sides):
    (_prefill, decode), (_p_local, d_local) = sides
    buffer = shm.PutBuffer(decode.shm.directory)  # the decode sidecar takes Puts too
    try:
        for tid, shared in (("put-bytes", False), ("put-shm", True)):
            for layer in range(LAYERS):
                raw, k, v = make_chunk(layer, 0, 40, list(range(40)))
                request = pb.PutRequest(transfer_id=tid, model=MODEL, level="raw")
                if shared:
                    request.shared.CopyFrom(buffer.write(raw.key, k, v))
                else:
                    request.chunk.CopyFrom(raw)
                await d_local.Put(request)
    finally:
        buffer.close()
    payloads = [[c.payload for c in decode.store.get(tid).chunks] for tid in ("put-bytes", "put-shm")]
    assert payloads[0] == payloads[1] and len(payloads[0]) == LAYERS


async def test_a_put_buffer_the_sidecar_cannot_read_is_refused_clearly(sides):
    _, (p_local, d_local) = sides
    raw, _, _ = make_chunk(0, 0, 8, list(range(8)))
    shared = pb.SharedChunk(key=raw.key, dtype="bfloat16", width=raw.width,
                            segment="kvpool-put-0123", offset=0, length=len(raw.keys) * 2)
    for local, message in ((d_local, "cannot open put buffer"), (p_local, "no shared memory")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await local.Put(pb.PutRequest(transfer_id="t8", model=MODEL, shared=shared))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert message in err.value.details()


async def test_put_buffers_of_gone_connectors_are_swept(sides, monkeypatch):
    (_prefill, decode), _ = sides
    monkeypatch.setattr(shm, "PUT_GRACE_S", 0.0)
    live = shm.PutBuffer(decode.shm.directory)
    gone = decode.shm.directory / "kvpool-put-00dead"
    gone.write_bytes(b"x")  # nobody holds its lock
    try:
        assert decode.shm.sweep_put_buffers() == 1
        assert not gone.exists() and live.path.exists()
    finally:
        live.close()
