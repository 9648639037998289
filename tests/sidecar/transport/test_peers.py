"""What two sidecars agree on before a transfer: its payload transport (NIXL when both
have it, gRPC otherwise, never a failed request) and who they are (instance ids: a
stream meant for another instance is refused). Real sidecars in this process, real gRPC
and, where installed, real NIXL (UCX) between them."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from kvpool.sidecar import peerwire
from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.transport import GrpcTransport, PeerRestarted
from tests.sidecar.test_sidecar_grpc import LAYERS, MODEL, load_all
from tests.sidecar.transport.test_sidecar_transport import assert_exact, put_levels

pytestmark = pytest.mark.asyncio

SMALL_NIXL = {"transport": "nixl", "nixl_slots": 4, "nixl_slot_bytes": 4 << 20}
"""A NIXL-preferring sidecar with a small registered pool (the chunks here are small)."""


def count(sidecar, counter, *labels) -> float:
    return counter.labels(*labels)._value.get()


async def transfer(p_local, d_local, prefill, decode, tid: str, mode: str) -> None:
    """One transfer of LAYERS raw chunks, pulled or pushed; checks it arrives bit-exact."""
    if mode == "pull":
        sent = await put_levels(p_local, tid, ["raw"] * LAYERS)
        got, end = await load_all(d_local, pb.LoadRequest(
            transfer_id=tid, model=MODEL, peer=prefill.peer_address,
            peer_instance=prefill.instance))
    else:
        loading = asyncio.create_task(load_all(d_local, pb.LoadRequest(
            transfer_id=tid, model=MODEL, expect_push=True, peer_instance=prefill.instance)))
        sent = await put_levels(p_local, tid, ["raw"] * LAYERS, push_to=decode.peer_address)
        got, end = await asyncio.wait_for(loading, 30)
    assert end.chunks == LAYERS
    assert_exact(sent, got)


@pytest.mark.parametrize("mode", ["pull", "push"])
async def test_two_nixl_sidecars_move_payloads_through_nixl(make_pair, mode):
    pytest.importorskip("nixl")
    (prefill, p_local), (decode, d_local) = await make_pair(SMALL_NIXL, SMALL_NIXL)
    assert prefill.transports == decode.transports == ("grpc", "nixl")
    await transfer(p_local, d_local, prefill, decode, "n1", mode)
    assert count(prefill, prefill.metrics.transports, "prefill", "nixl") == 1
    assert count(decode, decode.metrics.transports, "decode", "nixl") == 1
    assert decode.health.summary()["transports"] == {"nixl": 1}
    assert decode.health.summary()["transport_fallbacks"] == 0
    assert prefill.nixl.source.wait_idle(5), "the payloads were read from NIXL slots"


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("nixl_side", ["prefill", "decode"])
async def test_a_nixl_preferring_sidecar_with_a_grpc_only_peer_uses_grpc(
        make_pair, caplog, mode, nixl_side):
    """The peer is started with ``--transport grpc`` (it has no NIXL endpoints): each
    transfer goes over gRPC and succeeds; the NIXL side counts a fallback per transfer and
    logs it once."""
    pytest.importorskip("nixl")
    options = {"prefill": {}, "decode": {}}
    options[nixl_side] = SMALL_NIXL
    (prefill, p_local), (decode, d_local) = await make_pair(options["prefill"],
                                                           options["decode"])
    nixl, other = (prefill, decode) if nixl_side == "prefill" else (decode, prefill)
    assert nixl.transports == ("grpc", "nixl") and other.transports == ("grpc",)
    with caplog.at_level(logging.WARNING, logger="kvpool.sidecar"):
        for tid in ("g1", "g2"):
            await transfer(p_local, d_local, prefill, decode, tid, mode)
    assert count(prefill, prefill.metrics.transports, "prefill", "grpc") == 2
    assert count(decode, decode.metrics.transports, "decode", "grpc") == 2
    assert count(nixl, nixl.metrics.transport_fallbacks, nixl_side, "peer_lacks_nixl") == 2
    assert nixl.health.summary()["transports"] == {"grpc": 2}
    assert nixl.health.summary()["transport_fallbacks"] == 2
    assert other.health.summary()["transport_fallbacks"] == 0
    fallbacks = [r for r in caplog.records if r.getMessage().startswith("transport fallback")]
    assert len(fallbacks) == 1 and fallbacks[0].reason == "peer_lacks_nixl"
    assert decode.health.summary()["ok"] == 2


async def test_nixl_that_cannot_start_leaves_a_grpc_only_sidecar(make_pair, monkeypatch):
    """NIXL's import fails (mocked: the package is installed here, so its loader is made
    to raise as it does where it is missing): the sidecar still starts, advertises gRPC
    only, and its transfers with a NIXL peer take gRPC."""
    pytest.importorskip("nixl")
    from kvpool.sidecar import transport_nixl

    def missing():
        raise transport_nixl.TransportError("NIXL is not installed (mocked)")

    (prefill, p_local), _ = await make_pair(SMALL_NIXL, {})  # this one has NIXL
    monkeypatch.setattr(transport_nixl, "_nixl", missing)
    (_, _), (decode, d_local) = await make_pair({}, SMALL_NIXL)  # this one cannot
    assert decode.nixl is None and decode.transports == ("grpc",)
    await transfer(p_local, d_local, prefill, decode, "u1", "pull")
    assert count(decode, decode.metrics.transport_fallbacks, "decode", "nixl_unavailable") == 1
    assert count(prefill, prefill.metrics.transport_fallbacks, "prefill", "peer_lacks_nixl") == 1


async def test_info_and_hello_name_the_instance_and_transports(make_pair):
    (prefill, p_local), (decode, _) = await make_pair()
    info = await p_local.Info(pb.InfoRequest())
    assert info.instance == prefill.instance and list(info.transports) == ["grpc"]
    assert prefill.instance != decode.instance
    transport = GrpcTransport()
    try:
        hello = await transport.hello(decode.peer_address, timeout=10)
    finally:
        await transport.close()
    assert hello.instance == decode.instance and list(hello.transports) == ["grpc"]


async def test_a_push_meant_for_another_instance_is_refused(make_pair):
    """A decode sidecar restarted between the sender's Hello and its push: the stream
    names the old instance and is refused with the peer_restarted reason."""
    (_, _), (decode, d_local) = await make_pair()
    loading = asyncio.create_task(load_all(d_local, pb.LoadRequest(
        transfer_id="r1", model=MODEL, expect_push=True)))
    while decode.store.get("r1") is None:
        await asyncio.sleep(0.01)

    async def messages():
        yield peerwire.Message(header=pb.TransferHeader(
            transfer_id="r1", model=MODEL, instance="sender", receiver_instance="gone"))

    transport = GrpcTransport()
    try:
        with pytest.raises(PeerRestarted, match="FAILED_PRECONDITION: peer_restarted"):
            await transport.push(decode.peer_address, messages(), timeout=10)
    finally:
        await transport.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(loading, 30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details().startswith("peer_restarted:")
    assert decode.health.summary()["failure_reasons"] == {"peer_restarted": 1}
