"""The sidecar over real gRPC (unix socket + loopback TCP), without engines: transfers
pulled and pushed between two sidecars, checksums, leases, failures, health, metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpool.sidecar import chunks, codec, peerwire
from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.proto import sidecar_pb2_grpc as pb_grpc
from kvpool.sidecar.server import Sidecar, SidecarConfig, checksum
from kvpool.sidecar.store import TransferFailed
from kvpool.sidecar.transport import REASON_KEY, GrpcTransport

MODEL = "test-model"
WIDTH = 192
LAYERS = 3


def make_chunk(layer: int, start: int, end: int, tokens: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed * 1000 + layer * 100 + start)
    keys = torch.randn(end - start, WIDTH, generator=g).to(torch.bfloat16)
    values = torch.randn(end - start, WIDTH, generator=g).to(torch.bfloat16)
    raw = pb.RawChunk(
        key=pb.ChunkKey(layer=layer, token_start=start, token_end=end,
                        prefix_hash=chunks.prefix_hash(MODEL, tokens, end)),
        dtype="bfloat16", width=WIDTH, keys=chunks.to_bytes(keys), values=chunks.to_bytes(values),
    )
    return raw, keys, values


pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def pair(tmp_path):
    """A prefill and a decode sidecar, each with a Local client (unix socket)."""
    sidecars, channels = [], []
    for name in ("prefill", "decode"):
        s = Sidecar(SidecarConfig(local=f"unix://{tmp_path}/{name}.sock", lease_s=30,
                                  transfer_timeout_s=5))
        await s.start()
        sidecars.append(s)
        channels.append(grpc.aio.insecure_channel(s.config.local))
    yield sidecars, [pb_grpc.LocalStub(c) for c in channels]
    for c in channels:
        await c.close()
    for s in sidecars:
        await s.stop(grace=0)


async def put_transfer(local, tid, tokens, ranges, push_to="", level="raw", num_layers=0):
    sent = {}
    for start, end in ranges:
        for layer in range(LAYERS):
            raw, k, v = make_chunk(layer, start, end, tokens)
            await local.Put(pb.PutRequest(transfer_id=tid, model=MODEL, level=level,
                                          push_to=push_to, chunk=raw, num_layers=num_layers))
            sent[layer, start] = (k, v)
    await local.Seal(pb.SealRequest(transfer_id=tid, model=MODEL, num_tokens=ranges[-1][1],
                                    num_layers=LAYERS, push_to=push_to))
    return sent


async def load_all(local, request):
    got, end = {}, None
    async for reply in local.Load(request):
        if reply.WhichOneof("item") == "end":
            end = reply.end
        else:
            c = reply.chunk
            got[c.key.layer, c.key.token_start] = (
                chunks.from_bytes(c.keys, c.dtype, c.width),
                chunks.from_bytes(c.values, c.dtype, c.width),
            )
    return got, end


async def test_pull_delivers_every_chunk_bit_exact(pair):
    (prefill, decode), (p_local, d_local) = pair
    tokens = list(range(100))
    sent = await put_transfer(p_local, "t1", tokens, [(0, 64), (64, 100)])
    got, end = await load_all(d_local, pb.LoadRequest(
        transfer_id="t1", model=MODEL, peer=prefill.peer_address))
    assert end.num_tokens == 100 and end.chunks == 2 * LAYERS
    assert got.keys() == sent.keys()
    for key, (k, v) in sent.items():
        assert torch.equal(got[key][0], k) and torch.equal(got[key][1], v)
    assert decode.store.get("t1") is None, "a delivered transfer is not kept"


async def test_push_streams_while_produced_and_load_follows(pair):
    (_prefill, decode), (p_local, d_local) = pair
    tokens = list(range(64))
    load = asyncio.create_task(load_all(d_local, pb.LoadRequest(
        transfer_id="t2", model=MODEL, expect_push=True)))
    await asyncio.sleep(0.1)  # the decode side waits before anything was produced
    sent = await put_transfer(p_local, "t2", tokens, [(0, 32), (32, 64)],
                              push_to=decode.peer_address)
    got, end = await asyncio.wait_for(load, 10)
    assert end.chunks == 2 * LAYERS and got.keys() == sent.keys()
    assert all(torch.equal(got[k][0], sent[k][0]) for k in sent)


async def test_pushed_chunks_are_decoded_on_arrival_before_the_load(pair):
    """The decode sidecar decodes what a push brings as it comes: the Load, asked once
    prefill is done, finds every chunk decoded instead of decoding them after the fact."""
    level = "lossless" if "lossless" in codec.levels() else "raw"
    (_prefill, decode), (p_local, d_local) = pair
    tokens = list(range(64))
    sent = await put_transfer(p_local, "t2d", tokens, [(0, 32), (32, 64)], level=level,
                              push_to=decode.peer_address)
    await until(lambda: (t := decode.store.get("t2d")) is not None and t.end is not None)
    transfer = decode.store.get("t2d")
    assert sorted(transfer.decoded) == list(range(2 * LAYERS))
    await asyncio.wait_for(asyncio.gather(*transfer.decoded.values()), 10)
    got, end = await load_all(d_local, pb.LoadRequest(
        transfer_id="t2d", model=MODEL, expect_push=True))
    assert end.chunks == 2 * LAYERS and got.keys() == sent.keys()
    assert all(torch.equal(got[k][0], sent[k][0]) and torch.equal(got[k][1], sent[k][1])
               for k in sent)
    assert not transfer.decoded, "a loaded chunk's decoding is let go"


async def test_a_reader_that_closes_at_the_end_is_counted_loaded(pair):
    # A reader may close the Load stream as soon as it has the end, which cancels the call
    # and the handler with it: the transfer is counted before the end goes out.
    (_prefill, decode), (p_local, d_local) = pair
    await put_transfer(p_local, "t9", list(range(6)), [(0, 6)], push_to=decode.peer_address)
    loaded = decode.metrics.transfers.labels("decode", "loaded")
    call = d_local.Load(pb.LoadRequest(transfer_id="t9", model=MODEL, expect_push=True))
    async for reply in call:
        if reply.WhichOneof("item") == "end":
            assert loaded._value.get() == 1, "the end went out before the transfer was counted"
            call.cancel()
            break
    await asyncio.sleep(0.2)
    assert loaded._value.get() == 1
    assert decode.metrics.transfers.labels("decode", "failed")._value.get() == 0
    assert decode.store.get("t9") is None


async def test_first_token_skips_chunks_already_computed(pair):
    (prefill, _decode), (p_local, d_local) = pair
    await put_transfer(p_local, "t3", list(range(96)), [(0, 32), (32, 64), (64, 96)])
    got, _ = await load_all(d_local, pb.LoadRequest(
        transfer_id="t3", model=MODEL, peer=prefill.peer_address, first_token=64))
    assert {start for _, start in got} == {64}


async def test_unknown_transfer_fails_cleanly_and_is_counted(pair):
    (prefill, decode), (_p_local, d_local) = pair
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await load_all(d_local, pb.LoadRequest(transfer_id="nope", model=MODEL,
                                               peer=prefill.peer_address))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "NOT_FOUND" in err.value.details()
    assert decode.metrics.failures.labels("decode", "peer")._value.get() == 1


async def test_dead_peer_fails_the_load(pair, tmp_path):
    (prefill, decode), (p_local, d_local) = pair
    await put_transfer(p_local, "t4", list(range(32)), [(0, 32)])
    address = prefill.peer_address
    await prefill.stop(grace=0)
    with pytest.raises(grpc.aio.AioRpcError):
        await load_all(d_local, pb.LoadRequest(transfer_id="t4", model=MODEL, peer=address))
    assert decode.metrics.failures.labels("decode", "peer")._value.get() == 1


async def test_producer_failure_reaches_the_reader(pair):
    (prefill, _decode), (p_local, d_local) = pair
    raw, _, _ = make_chunk(0, 0, 32, list(range(32)))
    await p_local.Put(pb.PutRequest(transfer_id="t5", model=MODEL, chunk=raw))
    await p_local.Seal(pb.SealRequest(transfer_id="t5", model=MODEL, num_tokens=32,
                                      num_layers=LAYERS, failed=True))
    with pytest.raises(grpc.aio.AioRpcError):
        await load_all(d_local, pb.LoadRequest(transfer_id="t5", model=MODEL,
                                               peer=prefill.peer_address))


async def until(condition, timeout: float = 10.0) -> None:
    """Wait for ``condition()`` (another task's work) to hold."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "it never happened"
        await asyncio.sleep(0.01)


async def test_a_pushed_transfer_that_fails_ends_its_stream_with_a_failed_end(pair):
    # The push stream says the producer gave up (it used to be cancelled, which the
    # decode side could only report as a stream that "ended early").
    (prefill, decode), (p_local, d_local) = pair
    raw, _, _ = make_chunk(0, 0, 16, list(range(16)))
    await p_local.Put(pb.PutRequest(transfer_id="t12", model=MODEL, chunk=raw,
                                    push_to=decode.peer_address))
    await p_local.Seal(pb.SealRequest(transfer_id="t12", model=MODEL, num_tokens=16,
                                      num_layers=LAYERS, failed=True, push_to=decode.peer_address))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await load_all(d_local, pb.LoadRequest(transfer_id="t12", model=MODEL, expect_push=True))
    assert "gave up" in err.value.details()
    await until(lambda: prefill.metrics.failures.labels("prefill", "push")._value.get() == 1)


async def test_a_push_its_sender_abandons_fails_as_cancelled(pair):
    (_prefill, decode), _ = pair
    transport = GrpcTransport()

    async def messages():
        yield peerwire.Message(header=pb.TransferHeader(transfer_id="t13", model=MODEL))
        await asyncio.Event().wait()  # the producer stalls

    push = asyncio.create_task(transport.push(decode.peer_address, messages(), timeout=30))
    await until(lambda: decode.store.get("t13") is not None)
    await transport.close()  # the sending sidecar goes away
    await asyncio.gather(push, return_exceptions=True)
    transfer = decode.store.get("t13")
    await until(lambda: transfer.error is not None)
    assert "cancelled" in str(transfer.error)


async def test_push_raises_what_its_messages_raised(pair):
    (_prefill, decode), _ = pair
    transport = GrpcTransport()

    async def messages():
        yield peerwire.Message(header=pb.TransferHeader(transfer_id="t14", model=MODEL))
        raise TransferFailed("timeout", "the producer never finished")

    with pytest.raises(TransferFailed, match="never finished"):
        await transport.push(decode.peer_address, messages(), timeout=30)
    await transport.close()


async def test_peers_built_from_the_proto_interoperate(pair):
    # The Peer service (de)serializes chunks itself (kvpool.sidecar.peerwire): a client
    # generated from sidecar.proto still reads and writes the same stream.
    (prefill, decode), (p_local, _) = pair
    await put_transfer(p_local, "t15", list(range(16)), [(0, 16)])
    async with grpc.aio.insecure_channel(prefill.peer_address) as channel:
        got = [m async for m in pb_grpc.PeerStub(channel).Pull(
            pb.PullRequest(transfer_id="t15", model=MODEL))]
    assert [m.WhichOneof("item") for m in got] == ["header", *["chunk"] * LAYERS, "end"]
    assert all(checksum(m.chunk.payload) == m.chunk.crc32c for m in got[1:-1])
    got[0].header.transfer_id = "t16"
    async with grpc.aio.insecure_channel(decode.peer_address) as channel:
        reply = await pb_grpc.PeerStub(channel).Push(iter(got))
    assert reply.chunks == LAYERS
    pushed = decode.store.get("t16")
    assert pushed.end is not None and [c.payload for c in pushed.chunks] == [
        m.chunk.payload for m in got[1:-1]]


async def test_corrupt_chunk_is_refused_by_checksum(pair):
    (_prefill, decode), _ = pair
    transfer = decode.store.open("t6", MODEL)
    raw, _, _ = make_chunk(0, 0, 32, list(range(32)))
    payload = codec.encode(raw, "raw")
    bad = pb.WireChunk(key=raw.key, level="raw", payload=payload[:-1] + b"\x00",
                       crc32c=checksum(payload), raw_bytes=len(payload))
    wire = pb.PeerMessage(chunk=bad).SerializeToString()  # as a generated stub sends it
    decode.receive(transfer, peerwire.parse(wire), "test")
    assert transfer.error is not None and transfer.error.reason == "checksum"


async def test_lease_drops_held_kv(pair):
    (prefill, _), (p_local, _) = pair
    await put_transfer(p_local, "t7", list(range(32)), [(0, 32)])
    transfer = prefill.store.get("t7")
    assert prefill.store.expire(now=transfer.expires_at + 1) == [transfer]
    assert prefill.store.get("t7") is None


async def test_bad_input_is_a_clear_error(pair):
    (_, _), (p_local, _) = pair
    raw, _, _ = make_chunk(0, 0, 32, list(range(32)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p_local.Put(pb.PutRequest(transfer_id="t8", model=MODEL, level="nonsense",
                                        chunk=raw))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown transfer level" in err.value.details()


async def test_health_metrics_and_info(pair):
    (prefill, _), (p_local, _) = pair
    async with grpc.aio.insecure_channel(prefill.config.local) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = await p_local.Info(pb.InfoRequest())
    assert info.peer == prefill.peer_address and "raw" in info.levels
    await put_transfer(p_local, "t9", list(range(32)), [(0, 32)])
    url = f"http://{prefill.metrics_address}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    assert 'kvpool_sidecar_raw_bytes_total{direction="encoded"} ' in text
    assert 'kvpool_sidecar_chunks_total{direction="encoded",level="raw"} 3.0' in text


@pytest.mark.parametrize("level", ["lossless", "default"])
async def test_codec_levels_through_two_sidecars(pair, level):
    if level not in codec.levels():
        pytest.skip(f"codec level {level!r} is not built here")
    (prefill, _), (p_local, d_local) = pair
    tokens = list(range(128))
    sent = await put_transfer(p_local, "t10", tokens, [(0, 128)], level=level)
    transfer = prefill.store.get("t10")
    got, _ = await load_all(d_local, pb.LoadRequest(transfer_id="t10", model=MODEL,
                                                    peer=prefill.peer_address))
    for key, (k, v) in sent.items():
        if level == "lossless":
            assert torch.equal(got[key][0], k) and torch.equal(got[key][1], v)
        else:
            assert (got[key][0].float() - k.float()).abs().max() < 1.0
    if level == "default":  # Gaussian noise is the codec's worst case; real KV does better
        assert transfer.wire_bytes < transfer.raw_bytes / 3


async def test_each_layer_codes_with_its_bins_over_the_model_depth(pair):
    """The connector names the model's layer count: a one-layer chunk takes the bins of its
    layer in the level's schedule (``lowest`` changes them past 10 % of the depth)."""
    if "lowest" not in codec.levels():
        pytest.skip("the codec's lossy levels are not built here")
    from kvpool import kernels

    (prefill, _), (p_local, _) = pair
    await put_transfer(p_local, "t11", list(range(64)), [(0, 64)], level="lowest",
                       num_layers=LAYERS)
    bins = {c.key.layer: kernels.peek(c.payload).bins for c in prefill.store.get("t11").chunks}
    lowest = kernels.levels.get("lowest")
    assert bins == {i: [lowest.layer_bins(i, LAYERS)] for i in range(LAYERS)}
    assert bins[0] != bins[LAYERS - 1]


async def test_a_chunk_too_small_for_the_codec_goes_raw(pair):
    """A few tokens cost the codec more than they weigh (exact first rows, tables): such a
    chunk is sent as it is, and says so in its level."""
    if "default" not in codec.levels():
        pytest.skip("the codec's lossy levels are not built here")
    (prefill, _), (p_local, _) = pair
    await put_transfer(p_local, "t12", list(range(64)), [(0, 3), (3, 64)], level="default",
                       num_layers=LAYERS)
    levels = {(c.key.token_start, c.level) for c in prefill.store.get("t12").chunks}
    assert levels == {(0, "raw"), (3, "default")}


async def test_sidecars_with_a_profile_code_each_layer_with_its_slice(tmp_path):
    """Both sidecars given the model's profile: chunks name their layer's slice of it (no
    tables carried) and decode to the values sent; a decode sidecar without the profile
    cannot decode them: the load fails with reason profile_mismatch (decode recomputes)."""
    if "default" not in codec.levels():
        pytest.skip("the codec's lossy levels are not built here")
    from kvpool import kernels

    samples = []
    for seed in (7, 8):
        pairs = [make_chunk(layer, 0, 256, [], seed=seed)[1:] for layer in range(LAYERS)]
        samples.append(kernels.KVCache(keys=[k for k, _ in pairs], values=[v for _, v in pairs]))
    path = tmp_path / "model.kvprofile"
    kernels.Profile.build(samples, model=MODEL).save(path)
    profile = kernels.Profile.load(path)
    sidecars, channels = [], []
    for name, with_profile in (("prefill", True), ("decode", True), ("bare", False)):
        s = Sidecar(SidecarConfig(local=f"unix://{tmp_path}/{name}.sock", lease_s=30,
                                  transfer_timeout_s=5, profile=str(path) if with_profile else ""))
        await s.start()
        sidecars.append(s)
        channels.append(grpc.aio.insecure_channel(s.config.local))
    try:
        prefill = sidecars[0]
        p_local, d_local, bare_local = (pb_grpc.LocalStub(c) for c in channels)
        tokens = list(range(128))
        sent = await put_transfer(p_local, "tp", tokens, [(0, 128)], level="default",
                                  num_layers=LAYERS)
        held = prefill.store.get("tp").chunks
        assert {kernels.peek(c.payload).profile_hash for c in held} == {
            profile.slice_hash(layer, 1) for layer in range(LAYERS)}
        got, _ = await load_all(d_local, pb.LoadRequest(transfer_id="tp", model=MODEL,
                                                        peer=prefill.peer_address))
        for key, (k, v) in sent.items():
            assert (got[key][0].float() - k.float()).abs().max() < 1.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await load_all(bare_local, pb.LoadRequest(transfer_id="tp", model=MODEL,
                                                      peer=prefill.peer_address))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("profile_mismatch: ")
        assert (REASON_KEY, "profile_mismatch") in tuple(err.value.trailing_metadata())
        bare = sidecars[2]
        assert bare.metrics.failures.labels("decode", "profile_mismatch")._value.get() == 1
        assert bare.health.summary()["failure_reasons"] == {"profile_mismatch": 1}
    finally:
        for c in channels:
            await c.close()
        for s in sidecars:
            await s.stop(grace=0)
