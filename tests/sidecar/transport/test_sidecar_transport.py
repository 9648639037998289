"""The sidecar with this area's options: NIXL payloads, mutual TLS between sidecars, adaptive
levels per chunk and the transfer health endpoint (two real sidecars, real gRPC)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import pytest
import torch

from kvpool.sidecar import tls
from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.proto import sidecar_pb2_grpc as pb_grpc
from kvpool.sidecar.server import Sidecar, SidecarConfig
from tests.sidecar.test_sidecar_grpc import LAYERS, MODEL, load_all, make_chunk

pytestmark = pytest.mark.asyncio


async def put_levels(local, tid, levels, push_to=""):
    """One chunk per layer, layer i at ``levels[i]``; returns the tensors sent."""
    tokens = list(range(64))
    sent = {}
    for layer, level in enumerate(levels):
        raw, k, v = make_chunk(layer, 0, 64, tokens)
        await local.Put(pb.PutRequest(transfer_id=tid, model=MODEL, level=level,
                                      push_to=push_to, chunk=raw))
        sent[layer, 0] = (k, v)
    await local.Seal(pb.SealRequest(transfer_id=tid, model=MODEL, num_tokens=64,
                                    num_layers=len(levels), push_to=push_to))
    return sent


def assert_exact(sent, got):
    assert got.keys() == sent.keys()
    for key, (k, v) in sent.items():
        assert torch.equal(got[key][0], k) and torch.equal(got[key][1], v)


async def test_nixl_transport_pull_and_push_bit_exact_with_mixed_levels(make_pair):
    pytest.importorskip("nixl")
    (prefill, p_local), (decode, d_local) = await make_pair({"transport": "nixl"},
                                                           {"transport": "nixl"})
    sent = await put_levels(p_local, "n1", ["raw", "lossless", "raw"])
    got, end = await load_all(d_local, pb.LoadRequest(
        transfer_id="n1", model=MODEL, peer=prefill.peer_address))
    assert end.chunks == 3
    assert_exact(sent, got)
    load = asyncio.create_task(load_all(d_local, pb.LoadRequest(
        transfer_id="n2", model=MODEL, expect_push=True)))
    sent = await put_levels(p_local, "n2", ["lossless", "raw", "lossless"],
                            push_to=decode.peer_address)
    got, _ = await asyncio.wait_for(load, 20)
    assert_exact(sent, got)
    source = prefill.nixl.source
    assert source.wait_idle(5), "every slot read by decode is free again"
    assert decode.health.summary()["level_mix"] == {"lossless": 0.5, "raw": 0.5}


async def test_mixed_lossy_levels_decode_in_one_transfer(make_pair):
    (prefill, p_local), (_decode, d_local) = await make_pair()
    await put_levels(p_local, "m1", ["high", "low", "raw"])
    got, end = await load_all(d_local, pb.LoadRequest(
        transfer_id="m1", model=MODEL, peer=prefill.peer_address))
    assert end.chunks == 3 and len(got) == 3


async def test_mtls_between_sidecars_and_a_stranger_refused(make_pair, tmp_path):
    bundle = tls.generate_bundle()
    bundle.write(tmp_path / "pool-tls")
    tls.generate_bundle().write(tmp_path / "other-tls")
    (prefill, p_local), (_decode, d_local) = await make_pair(
        {"tls_dir": str(tmp_path / "pool-tls")}, {"tls_dir": str(tmp_path / "pool-tls")})
    sent = await put_levels(p_local, "s1", ["raw"] * LAYERS)
    got, _ = await load_all(d_local, pb.LoadRequest(
        transfer_id="s1", model=MODEL, peer=prefill.peer_address))
    assert_exact(sent, got)

    stranger = Sidecar(SidecarConfig(local=f"unix://{tmp_path}/stranger.sock",
                                     tls_dir=str(tmp_path / "other-tls"), transfer_timeout_s=5))
    await stranger.start()
    try:
        await put_levels(p_local, "s2", ["raw"] * LAYERS)
        async with grpc.aio.insecure_channel(stranger.config.local) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await load_all(pb_grpc.LocalStub(channel), pb.LoadRequest(
                    transfer_id="s2", model=MODEL, peer=prefill.peer_address))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stranger.health.summary()["failed"] == 1
        assert prefill.store.get("s2") is not None, "nothing was served to the stranger"
    finally:
        await stranger.stop(grace=0)


async def test_adaptive_levels_per_chunk_and_recompute_when_late(make_pair):
    """Nothing measured yet (pulled after the fact): the policy's start level; once the
    deadline has passed: recompute, and decode's Load fails so vLLM recomputes."""
    (prefill, p_local), (_decode, d_local) = await make_pair(
        {"level": "adaptive", "ttft_target_s": 30.0, "decode_reserve_s": 0.0})
    await put_levels(p_local, "a1", ["", "", ""])
    got, end = await load_all(d_local, pb.LoadRequest(
        transfer_id="a1", model=MODEL, peer=prefill.peer_address))
    assert end.chunks == 3 and len(got) == 3
    assert prefill.policy.counts == {"default": 3}
    assert prefill.policy.estimator.samples == 3, "the peer stream fed the estimator"
    prefill.config.ttft_target_s = 0.0  # already late: nothing can arrive in time
    await put_levels(p_local, "a2", ["", "", ""])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await load_all(d_local, pb.LoadRequest(
            transfer_id="a2", model=MODEL, peer=prefill.peer_address))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert prefill.policy.counts.get("recompute") == 1
    assert prefill.health.summary()["recomputed"] == 1


async def test_transfer_health_endpoint(make_pair):
    (prefill, p_local), (decode, d_local) = await make_pair()
    await put_levels(p_local, "h1", ["raw"] * LAYERS)
    await load_all(d_local, pb.LoadRequest(transfer_id="h1", model=MODEL,
                                           peer=prefill.peer_address))

    def fetch(path: str) -> bytes:
        with urllib.request.urlopen(f"http://{decode.metrics_address}{path}", timeout=5) as r:
            return r.read()

    summary = json.loads(await asyncio.to_thread(fetch, "/transfer/health"))
    assert summary["ok"] == 1 and summary["raw_bytes"] > 0 and summary["healthy"]
    metrics = (await asyncio.to_thread(fetch, "/metrics")).decode()
    assert 'kvpool_transfers_total{outcome="ok"} 1.0' in metrics
    assert "kvpool_sidecar_chunks_total" in metrics
