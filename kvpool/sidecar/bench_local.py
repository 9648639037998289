"""The connector's side of a transfer, with its own sidecar: ``Put`` and the decode load.

One transfer of ``--tokens`` prompt tokens x ``--layers`` layers (keys and values of
``--width`` bf16 values per token, SmolLM2-135M's shape by default), put by the real
connector code (:meth:`KVPoolWorker._put`, one chunk per layer and prefill step of
``--chunk-tokens``) into a prefill sidecar that pushes it to a decode sidecar, which
decodes it on arrival. Then the decode connector's :meth:`KVPoolWorker._fill` loads it
into a paged KV cache (vLLM's CPU layout) over the unix socket: with chunks as bytes in
the messages, or as descriptors of the decode sidecar's shared memory
(:mod:`kvpool.sidecar.shm`). The sidecars run in another process, as beside an engine.

Reported (medians over ``--runs`` alternating runs), each for ``bytes`` and ``shm``:
``fill_ms`` (wall time of ``_fill``, the load left exposed once the KV has arrived) and
``fill_cpu_ms`` (its CPU time in the connector process); ``put_ms`` and ``put_cpu_ms``
(every Put of one transfer, alone: wall time, and CPU time of the connector process and
the sidecars' process together, which on a prefill worker competes with the forward pass).

``kvpool bench local --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from typing import Any

from kvpool.sidecar.bench_stream import _cpu_s

MODEL = "bench-local"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--width", type=int, default=192, help="kv_heads * head_dim")
    parser.add_argument("--chunk-tokens", type=int, default=4096,
                        help="tokens per Put (prefill's step)")
    parser.add_argument("--level", default="raw")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")


# -- the sidecars (another process) ------------------------------------------------------------


def _sidecars(conn: Any, folder: str, shm_dir: str) -> None:
    from kvpool.sidecar.server import Sidecar, SidecarConfig

    async def main() -> None:
        made = []
        for name, shared in (("prefill", shm_dir), ("bytes", "off"), ("shm", shm_dir)):
            s = Sidecar(SidecarConfig(local=f"unix://{folder}/{name}.sock", metrics="",
                                      shm_dir=shared, shm_max_bytes=8 << 30))
            await s.start()
            made.append(s)
        conn.send({s.config.local: s.peer_address for s in made})
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, conn.recv))[0] != "stop":
            if command[0] == "cpu":
                conn.send(_cpu_s())
            elif command[0] == "decoded":  # every chunk of a transfer arrived and decoded
                _, tid = command
                for _ in range(6000):
                    t = next((s.store.get(tid) for s in made[1:] if s.store.get(tid)), None)
                    if t is not None and t.end is not None and all(
                            f.done() for f in t.decoded.values()):
                        break
                    await asyncio.sleep(0.01)
                conn.send(t is not None and t.end is not None)
        for s in made:
            await s.stop(grace=0)

    asyncio.run(main())


# -- the connector (this process) ------------------------------------------------------------


def _worker(address: str, args: argparse.Namespace, shm_dir: str):
    import torch

    from kvpool.sidecar.connector import ConnectorConfig, KVPoolWorker

    worker = KVPoolWorker(ConnectorConfig(sidecar=f"{address}", model=MODEL, level=args.level,
                                          block_size=32, load_timeout_s=60, shm_dir=shm_dir))
    heads, head_dim = 3, args.width // 3
    blocks = -(-args.tokens // 32)
    worker.register_kv_caches({
        f"model.layers.{i}.self_attn.attn": torch.zeros(blocks, heads, 32, 2 * head_dim,
                                                        dtype=torch.bfloat16)
        for i in range(args.layers)})
    return worker


def _put(worker, tid: str, push_to: str, kv: list, args: argparse.Namespace) -> None:
    from kvpool.sidecar import chunks
    from kvpool.sidecar.connector import SaveSpec

    tokens = list(range(args.tokens))
    for start in range(0, args.tokens, args.chunk_tokens):
        end = min(start + args.chunk_tokens, args.tokens)
        spec = SaveSpec(transfer_id=tid, block_ids=[], start=start, end=end,
                        prefix_hash=chunks.prefix_hash(MODEL, tokens, end),
                        num_prompt_tokens=args.tokens, level=args.level, push_to=push_to)
        for layer, (k, v) in enumerate(kv):
            worker._put(spec, layer, k[start:end], v[start:end])
    worker._seal(spec, args.layers)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kvpool.sidecar.connector import LoadSpec
    from kvpool.sidecar.proto import sidecar_pb2 as pb

    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(args.tokens, args.width, generator=g).to(torch.bfloat16),
           torch.randn(args.tokens, args.width, generator=g).to(torch.bfloat16))
          for _ in range(args.layers)]
    folder = tempfile.mkdtemp(prefix="kvpool-bench-local-")
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_sidecars, args=(child_conn, folder, args.shm_dir), daemon=True)
    child.start()
    try:
        peers = conn.recv()
        prefill = {path: _worker(f"unix://{folder}/prefill.sock", args, shared)
                   for path, shared in (("bytes", "off"), ("shm", args.shm_dir))}
        loaders = {path: _worker(f"unix://{folder}/{path}.sock", args, args.shm_dir)
                   for path in ("bytes", "shm")}
        directory = loaders["shm"].shared_dir()
        if directory is None:
            raise RuntimeError(f"the connector does not see {args.shm_dir}")
        runs: dict[str, list[tuple[float, float]]] = {
            "bytes": [], "shm": [], "put_bytes": [], "put_shm": []}
        for i in range(args.runs + 1):  # the first round warms up
            for path in ("bytes", "shm"):  # Put alone: wall and CPU, both processes
                tid = f"put-{path}-{i}"
                conn.send(("cpu",))
                cpu0, own0, t0 = conn.recv(), _cpu_s(), time.perf_counter()
                _put(prefill[path], tid, "", kv, args)
                put_s = time.perf_counter() - t0
                conn.send(("cpu",))
                put_cpu = conn.recv() - cpu0 + _cpu_s() - own0
                prefill[path].client.seal(pb.SealRequest(transfer_id=tid, failed=True))
                if i:
                    runs[f"put_{path}"].append((put_s, put_cpu))
            for path, worker in loaders.items():
                tid = f"{path}-{i}"
                _put(prefill["shm"], tid, peers[f"unix://{folder}/{path}.sock"], kv, args)
                conn.send(("decoded", tid))
                if not conn.recv():
                    raise RuntimeError(f"transfer {tid} did not arrive")
                spec = LoadSpec(request_id=tid, transfer_id=tid, peer="", expect_push=True,
                                block_ids=list(range(-(-args.tokens // 32))), first_token=0,
                                token_ids=list(range(args.tokens)))
                own0, t0 = _cpu_s(), time.perf_counter()
                worker._fill(spec, directory if path == "shm" else None)
                fill = (time.perf_counter() - t0, _cpu_s() - own0)
                if path == "shm":
                    worker.client.release(tid)
                if i:
                    runs[path].append(fill)
        for worker in (*prefill.values(), *loaders.values()):
            worker.shutdown()
    finally:
        conn.send(("stop",))
        child.join(30)
        if child.is_alive():
            child.kill()

    def med(samples: list[tuple[float, float]], i: int) -> float:
        return round(1e3 * statistics.median(s[i] for s in samples), 2)

    raw = 2 * args.tokens * args.width * 2 * args.layers
    return {
        "tokens": args.tokens, "layers": args.layers, "raw_bytes": raw,
        "chunk_tokens": args.chunk_tokens, "level": args.level, "runs": args.runs,
        "fill_ms": {p: med(runs[p], 0) for p in ("bytes", "shm")},
        "fill_cpu_ms": {p: med(runs[p], 1) for p in ("bytes", "shm")},
        "fill_ms_runs": {p: [round(1e3 * s[0], 1) for s in runs[p]] for p in ("bytes", "shm")},
        "shm_speedup": round(med(runs["bytes"], 0) / max(med(runs["shm"], 0), 1e-3), 2),
        "put_ms": {p: med(runs[f"put_{p}"], 0) for p in ("bytes", "shm")},
        "put_cpu_ms": {p: med(runs[f"put_{p}"], 1) for p in ("bytes", "shm")},
    }


def run(args: argparse.Namespace) -> int:
    result = run_bench(args)
    if not args.json:
        f = result["fill_ms"]
        c = result["put_cpu_ms"]
        print(f"fill of {result['raw_bytes'] / 2**20:.0f} MiB: bytes {f['bytes']} ms, "
              f"shm {f['shm']} ms ({result['shm_speedup']}x); Put CPU: bytes {c['bytes']} "
              f"ms, shm {c['shm']} ms", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(p)
    raise SystemExit(run(p.parse_args()))

