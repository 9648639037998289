"""Chaos between real sidecar processes (gRPC on loopback, raw level, no engines).

Each case breaks a transfer on purpose (decode sidecar killed, peer restarted on the same
port: refused by its instance id, a byte flipped on the wire, a starved link) and checks the same three things:
the request ends (by transfer or by recompute: the connector recomputes when its Load
fails) by the sidecar's own deadline, never the test's guard; the right counter is
raised; and nothing is left behind (held transfers and bytes back to zero).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio
import torch

from kvpool.sidecar import chunks
from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.proto import sidecar_pb2_grpc as pb_grpc
from tests.sidecar.conftest import SidecarProcess, free_port
from tests.sidecar.test_sidecar_grpc import LAYERS, MODEL, make_chunk
from tests.sidecar.transport.wire import Proxy

pytestmark = pytest.mark.asyncio

TIMEOUT_S = 3.0
"""The sidecars' --transfer-timeout: every wait of a transfer ends by then."""
LEASE_S = 4.0
"""The sidecars' --lease: held KV is dropped by then at the latest."""
GUARD_S = 60.0
"""The test's own limit on any call: reaching it means a hang (the sidecar's deadline
is the one that must end things, far sooner)."""

FAILURES = "kvpool_sidecar_transfer_failures_total"
RECOMPUTES = "kvpool_recompute_fallbacks_total"


@pytest_asyncio.fixture
async def cluster(tmp_path):
    """Start sidecar processes (together) with short deadlines; stop them all after."""
    started: list[SidecarProcess] = []
    channels: list[grpc.aio.Channel] = []

    def start(*names: str, at: dict[str, str] | None = None) -> list[SidecarProcess]:
        """The named sidecars, each at a free port or at its peer address in ``at``."""
        new = [SidecarProcess(n, tmp_path, transfer_timeout=TIMEOUT_S, lease=LEASE_S,
                              peer=(at or {}).get(n, "127.0.0.1:0"), wait=False)
               for n in names]
        started.extend(new)
        return [p.wait_ready() for p in new]

    def local(sidecar: SidecarProcess) -> pb_grpc.LocalStub:
        channel = grpc.aio.insecure_channel(f"unix://{sidecar.socket}")
        channels.append(channel)
        return pb_grpc.LocalStub(channel)

    yield start, local
    for channel in channels:
        await channel.close()
    for process in started:
        process.kill()  # nothing of theirs outlives the test: no graceful stop to wait for
        process.stop()


async def metric(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    return await asyncio.to_thread(sidecar.metric, name, **labels)


async def until(sidecar: SidecarProcess, name: str, value: float, *, at_least: bool = False,
                **labels: str) -> None:
    """Wait for a metric to be ``value`` (or more, ``at_least``); fails at the guard:
    something leaked or hung."""
    async def reached() -> None:
        while True:
            now = await metric(sidecar, name, **labels)
            if now == value or (at_least and now > value):
                return
            await asyncio.sleep(0.1)
    try:
        await asyncio.wait_for(reached(), GUARD_S)
    except TimeoutError:
        pytest.fail(f"{sidecar.name}: {name}{labels} is "
                    f"{await metric(sidecar, name, **labels)}, never {value}")


async def nothing_held(*sidecars: SidecarProcess) -> None:
    for sidecar in sidecars:
        await until(sidecar, "kvpool_sidecar_held_transfers", 0)
        await until(sidecar, "kvpool_sidecar_held_bytes", 0)


async def put(local, tid: str, layers, push_to: str = "", seal: bool = True):
    """Put one 64-token chunk per layer in ``layers`` (and seal); returns the tensors."""
    tokens = list(range(64))
    sent = {}
    for layer in layers:
        raw, k, v = make_chunk(layer, 0, 64, tokens)
        await asyncio.wait_for(local.Put(pb.PutRequest(
            transfer_id=tid, model=MODEL, push_to=push_to, chunk=raw)), GUARD_S)
        sent[layer] = (k, v)
    if seal:
        await asyncio.wait_for(local.Seal(pb.SealRequest(
            transfer_id=tid, model=MODEL, num_tokens=64, num_layers=LAYERS,
            push_to=push_to)), GUARD_S)
    return sent


async def load(local, request: pb.LoadRequest):
    """What a connector gets: ``(chunks by layer, the end or None, the error or None)``."""
    got, end = {}, None
    try:
        async for reply in local.Load(request, timeout=GUARD_S):
            if reply.WhichOneof("item") == "end":
                end = reply.end
            else:
                c = reply.chunk
                got[c.key.layer] = (chunks.from_bytes(c.keys, c.dtype, c.width),
                                    chunks.from_bytes(c.values, c.dtype, c.width))
    except grpc.aio.AioRpcError as exc:
        return got, end, exc
    return got, end, None


def recomputes(error: grpc.aio.AioRpcError | None) -> None:
    """The Load failed the way that makes the connector recompute: the sidecar ended it
    (UNAVAILABLE), not the caller's guard (DEADLINE_EXCEEDED)."""
    assert error is not None, "the transfer was expected to fail"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error


def exact(sent: dict, got: dict) -> None:
    assert got.keys() == sent.keys()
    for layer, (k, v) in sent.items():
        assert torch.equal(got[layer][0], k) and torch.equal(got[layer][1], v)


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_killing_the_decode_sidecar_mid_transfer(cluster, mode):
    start, local = cluster
    prefill, decode = start("prefill", "decode")
    p_local, d_local = local(prefill), local(decode)
    push_to = decode.peer if mode == "push" else ""
    await put(p_local, "t", [0], push_to=push_to, seal=False)
    loading = asyncio.create_task(load(d_local, pb.LoadRequest(
        transfer_id="t", model=MODEL, expect_push=mode == "push",
        peer=prefill.peer if mode == "pull" else "")))
    await until(decode, "kvpool_sidecar_wire_bytes_total", 1, at_least=True,
                direction="received")  # the first chunk is across
    decode.kill()  # mid-transfer

    _, end, error = await loading
    assert end is None and error is not None  # the decode connector sees its sidecar gone
    # The prefill side neither hangs nor sends on: it counts the failure and lets go of the
    # chunks at once; the rest of the transfer is accepted and dropped.
    await until(prefill, FAILURES, 1, side="prefill", reason=mode)
    await until(prefill, "kvpool_sidecar_held_bytes", 0)
    await put(p_local, "t", range(1, LAYERS), push_to=push_to)
    assert await metric(prefill, "kvpool_sidecar_held_bytes") == 0
    await nothing_held(prefill)  # and the entry itself at its lease
    assert await metric(prefill, FAILURES, side="prefill", reason=mode) == 1


async def test_a_peer_restarted_on_the_same_port_never_serves_stale_state(cluster):
    """Each sidecar process is an instance, named with its transfers (kv_transfer_params
    ``kvpool_instance``, the Load and Pull requests, the streams' headers): a new process
    at the old address refuses what names the old one, and decode recomputes it under the
    reason ``peer_restarted``."""
    start, local = cluster
    address = f"127.0.0.1:{free_port()}"
    old, decode = start("prefill-old", "decode", at={"prefill-old": address})
    old_local, d_local = local(old), local(decode)
    await put(old_local, "sealed", range(LAYERS))
    await put(old_local, "growing", [0], seal=False)
    pulling = asyncio.create_task(load(d_local, pb.LoadRequest(
        transfer_id="growing", model=MODEL, peer=address, peer_instance=old.instance)))
    await until(decode, "kvpool_sidecar_wire_bytes_total", 1, at_least=True,
                direction="received")  # the first chunk is across

    old.kill()
    old.popen.wait()
    new, = start("prefill-new", at={"prefill-new": address})
    assert new.instance != old.instance
    _, end, error = await pulling  # the stream from the old process broke
    recomputes(error)
    assert end is None
    # What the old process held is refused by the new one at the same address ...
    got, end, error = await load(d_local, pb.LoadRequest(
        transfer_id="sealed", model=MODEL, peer=address, peer_instance=old.instance))
    recomputes(error)
    assert "peer_restarted" in error.details() and not got and end is None
    assert await metric(new, FAILURES, side="prefill", reason="peer_restarted") == 1
    # ... and a transfer decode waits for from the old one is not taken from the new one
    # (whether the new one's push comes before the Load or after).
    pushed = asyncio.create_task(load(d_local, pb.LoadRequest(
        transfer_id="pushed", model=MODEL, expect_push=True, peer_instance=old.instance)))
    await put(local(new), "pushed", range(LAYERS), push_to=decode.peer)
    got, end, error = await pushed
    recomputes(error)
    assert "peer_restarted" in error.details() and not got and end is None
    assert await metric(decode, FAILURES, side="decode", reason="peer") == 1
    assert await metric(decode, FAILURES, side="decode", reason="peer_restarted") == 2
    assert await metric(decode, RECOMPUTES, reason="peer_restarted") == 2
    health = await asyncio.to_thread(decode.health)
    assert health["failure_reasons"] == {"peer": 1, "peer_restarted": 2}
    # The new process serves its own transfers at that address.
    sent = await put(local(new), "fresh", range(LAYERS))
    got, end, error = await load(d_local, pb.LoadRequest(
        transfer_id="fresh", model=MODEL, peer=address, peer_instance=new.instance))
    assert error is None and end.chunks == LAYERS
    exact(sent, got)
    await nothing_held(decode, new)


async def load_through_proxy(cluster, mode: str):
    """A transfer put at a prefill sidecar and loaded by a decode sidecar that pulls it
    through a :class:`Proxy` in ``mode``: (prefill, decode, proxy, load's result)."""
    start, local = cluster
    prefill, decode = start("prefill", "decode")
    proxy = await Proxy(prefill.peer, mode).start()
    try:
        await put(local(prefill), "t", range(LAYERS))
        result = await load(local(decode), pb.LoadRequest(
            transfer_id="t", model=MODEL, peer=proxy.address))
    finally:
        await proxy.stop()
    return prefill, decode, proxy, result


async def test_a_chunk_corrupted_on_the_wire_never_reaches_the_connector(cluster):
    prefill, decode, proxy, (got, end, error) = await load_through_proxy(cluster, "corrupt")
    assert proxy.corrupted == 1
    recomputes(error)
    assert "corrupt" in error.details()
    assert not got and end is None  # the first chunk was hit: nothing went to the KV cache
    assert await metric(decode, FAILURES, side="decode", reason="checksum") == 1
    assert await metric(decode, RECOMPUTES, reason="checksum") == 1
    await nothing_held(decode, prefill)


@pytest.mark.parametrize("mode", ["stall", "silent"])
async def test_a_starved_link_ends_at_the_deadline_in_recompute(cluster, mode):
    """``stall``: the prefill sidecar answers but its bytes never arrive; ``silent``: the
    peer accepts the connection and never says anything."""
    prefill, decode, proxy, (got, end, error) = await load_through_proxy(cluster, mode)
    recomputes(error)
    assert not got and end is None
    assert await metric(decode, FAILURES, side="decode", reason="timeout") == 1
    assert await metric(decode, RECOMPUTES, reason="timeout") == 1
    if mode == "stall":
        assert proxy.swallowed > 0
    await nothing_held(decode, prefill)


async def test_the_connector_names_the_sidecar_instance_it_reaches_now(cluster):
    """Prefill's connector puts its sidecar's instance in kv_transfer_params: asked once,
    and again after the sidecar restarted (the connection to it was lost)."""
    from kvpool.sidecar.connector import ConnectorConfig, KVPoolScheduler

    start, _ = cluster
    first, = start("prefill")
    scheduler = KVPoolScheduler(ConnectorConfig(
        sidecar=f"unix://{first.socket}", model=MODEL, level="", block_size=16,
        load_timeout_s=TIMEOUT_S))
    assert await asyncio.to_thread(scheduler.sidecar_info) == (first.peer, first.instance)
    first.kill()
    first.popen.wait()
    second, = start("prefill")  # the same socket

    async def renamed() -> None:
        while await asyncio.to_thread(scheduler.sidecar_info) != (second.peer,
                                                                  second.instance):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(renamed(), GUARD_S)
