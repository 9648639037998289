"""The KV connector's worker with real sidecars over their unix sockets (no engine): Puts
through its put buffer, loads scattered from shared memory into a paged cache (vLLM's CPU
layout) identical to loads over bytes, and the fallbacks when memory is not shared."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from kvpool.sidecar import chunks
from kvpool.sidecar.connector import ConnectorConfig, KVPoolWorker, LoadSpec, SaveSpec
from tests.sidecar.test_shm import segment_files, sidecars
from tests.sidecar.test_sidecar_grpc import LAYERS, MODEL, WIDTH, make_chunk, until

pytestmark = pytest.mark.asyncio

BLOCK = 16
TOKENS = 72  # 4 whole blocks and a partial one
HEADS = 3


def worker(sidecar, shm_dir: str) -> KVPoolWorker:
    w = KVPoolWorker(ConnectorConfig(sidecar=sidecar.config.local, model=MODEL, level="",
                                     block_size=BLOCK, load_timeout_s=10, shm_dir=shm_dir))
    w.register_kv_caches({
        f"model.layers.{i}.self_attn.attn": torch.zeros(
            8, HEADS, BLOCK, 2 * WIDTH // HEADS, dtype=torch.bfloat16)
        for i in range(LAYERS)})
    return w


def put(w: KVPoolWorker, tid: str, push_to: str) -> dict:
    """A transfer of TOKENS tokens in two prefill steps, through the worker's real Put."""
    tokens, sent = list(range(TOKENS)), {}
    for start, end in ((0, 40), (40, TOKENS)):
        spec = SaveSpec(transfer_id=tid, block_ids=[], start=start, end=end,
                        prefix_hash=chunks.prefix_hash(MODEL, tokens, end),
                        num_prompt_tokens=TOKENS, level="raw", push_to=push_to)
        for layer in range(LAYERS):
            _, k, v = make_chunk(layer, start, end, tokens)
            w._put(spec, layer, k, v)
            sent[layer, start] = (k, v)
    w._seal(spec, LAYERS)
    return sent


def load_spec(tid: str) -> LoadSpec:
    return LoadSpec(request_id=tid, transfer_id=tid, peer="", expect_push=True,
                    block_ids=[5, 2, 7, 0, 3], first_token=0, token_ids=list(range(TOKENS)))


async def load(w: KVPoolWorker, tid: str) -> tuple[set, set]:
    await asyncio.to_thread(w._load, load_spec(tid))
    results = w.get_transfer_results()
    return results.finished_recving, results.failed_recving


def cache_of(w: KVPoolWorker) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values of the request's tokens, read back from the cache."""
    blocks, offsets = chunks.token_slots(load_spec("").block_ids, BLOCK, 0, TOKENS)
    return [chunks.layout_for(kv).gather(kv, blocks, offsets)
            for kv in (w.kv_caches[n] for n in w.layer_names)]


async def test_puts_and_loads_through_shared_memory_fill_the_same_cache(tmp_path):
    shared = tmp_path / "shm"
    shared.mkdir()
    async with sidecars(tmp_path, str(shared), str(shared)) as ((prefill, decode), _):
        producer = worker(prefill, "")
        by_shm, by_bytes = worker(decode, ""), worker(decode, "off")
        try:
            assert await asyncio.to_thread(producer.shared_dir) == shared
            sent = await asyncio.to_thread(put, producer, "a", decode.peer_address)
            assert producer._put_buf is not None and producer._put_buf.path.exists()
            assert prefill.store.get("a").raw_bytes == sum(
                k.numel() * 4 for k, _ in sent.values())
            await asyncio.to_thread(put, producer, "b", decode.peer_address)
            await until(lambda: all(decode.store.get(t) and decode.store.get(t).end
                                    for t in "ab"))
            assert await load(by_shm, "a") == ({"a"}, set())
            assert decode.metrics.local_chunks.labels("shm")._value.get() == 2 * LAYERS
            assert decode.shm.get("a") is None, "released once loaded"
            assert await load(by_bytes, "b") == ({"b"}, set())
            assert segment_files(decode) == []
            for layer, ((k1, v1), (k2, v2)) in enumerate(zip(cache_of(by_shm),
                                                             cache_of(by_bytes))):
                assert torch.equal(k1, k2) and torch.equal(v1, v2)
                want = torch.cat([sent[layer, 0][0], sent[layer, 40][0]])
                assert torch.equal(k1, want)
        finally:
            for w in (producer, by_shm, by_bytes):
                w.shutdown()
        assert not list(shared.glob("kvpool-put-*")), "the put buffer goes with its worker"


async def test_a_connector_elsewhere_puts_and_loads_bytes(tmp_path):
    """The connector's directory holds a copy of the probe but is not the sidecar's: its
    Puts are refused by the sidecar, which it takes as a cue to send bytes; the decode
    side never sees its probe and asks for bytes."""
    shared, elsewhere = tmp_path / "shm", tmp_path / "elsewhere"
    shared.mkdir()
    elsewhere.mkdir()
    async with sidecars(tmp_path, str(shared), str(shared)) as ((prefill, decode), _):
        shutil.copy(shared / prefill.shm.probe, elsewhere)
        producer, consumer = worker(prefill, str(elsewhere)), worker(decode, str(elsewhere))
        try:
            sent = await asyncio.to_thread(put, producer, "c", decode.peer_address)
            assert producer._put_off and producer.stats["save_failures"] == 0
            assert len(prefill.store.get("c").chunks) == 2 * LAYERS
            assert await asyncio.to_thread(consumer.shared_dir) is None
            assert await load(consumer, "c") == ({"c"}, set())
            assert torch.equal(cache_of(consumer)[0][0][:40], sent[0, 0][0])
        finally:
            producer.shutdown()
            consumer.shutdown()


async def test_a_segment_gone_before_the_load_makes_the_request_recompute(tmp_path):
    shared = tmp_path / "shm"
    shared.mkdir()
    async with sidecars(tmp_path, "off", str(shared)) as ((_prefill, decode), _):
        producer, consumer = worker(_prefill, ""), worker(decode, "")
        try:
            await asyncio.to_thread(put, producer, "d", decode.peer_address)
            await until(lambda: (t := decode.store.get("d")) is not None and t.end is not None
                        and all(f.done() for f in t.decoded.values()))
            (shared / decode.store.get("d").segment.name).unlink()  # lost under the sidecar
            assert await load(consumer, "d") == ({"d"}, {"d"})
            assert consumer.stats["load_failures"] == 1
            assert not consumer._shm_known, "the next load asks the sidecar again"
            assert await asyncio.to_thread(consumer.shared_dir) == shared
        finally:
            producer.shutdown()
            consumer.shutdown()


async def test_bench_local_reports_both_paths(tmp_path):
    """``kvpool bench local`` on a small transfer: its JSON keys (no timings checked)."""
    import argparse

    from kvpool.sidecar import bench_local

    parser = argparse.ArgumentParser()
    bench_local.configure(parser)
    result = await asyncio.to_thread(bench_local.run_bench, parser.parse_args([
        "--tokens", "96", "--layers", "2", "--chunk-tokens", "64", "--runs", "1",
        "--shm-dir", str(tmp_path)]))
    for key in ("fill_ms", "fill_cpu_ms", "put_ms", "put_cpu_ms"):
        assert set(result[key]) == {"bytes", "shm"}
    assert result["raw_bytes"] == 2 * 96 * 192 * 2 * 2
    assert not list(tmp_path.glob("kvpool-*")), "every file removed at the end"
