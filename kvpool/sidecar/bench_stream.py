"""The sidecars' KV stream against a plain TCP socket on loopback (``grpc_vs_tcp``).

Both sides move the same transfer: ``mib`` MiB in chunks of ``chunk_mib`` MiB of random
bytes (distinct payloads, more of them than the CPU caches hold), from this process to a
receiver in another process, which keeps every chunk until the transfer is complete, as
a decode sidecar does.

* gRPC: the sidecar's own code on both ends: a :class:`~kvpool.sidecar.store.Transfer`
  streamed by :class:`~kvpool.sidecar.transport.GrpcTransport` ``push`` (what a prefill
  sidecar does) into the ``Peer.Push`` service of a real
  :class:`~kvpool.sidecar.server.Sidecar`, which checks every chunk's CRC-32C and stores it.
* TCP: each chunk as an 8-byte length and its payload on one socket; the receiver reads
  each into a buffer of its own.

Runs alternate (gRPC, TCP, gRPC, ...) after one warm-up of each, so that load from other
processes on the machine weighs on both alike; ``grpc_vs_tcp`` is the median of the
per-pair ratios, ``grpc_vs_tcp_runs`` every pair's ratio (the spread). Where other work
competes for the CPUs, the CPU time each side spends per byte (``cpu_ns_per_byte``, sender
and receiver processes, all their threads) is the steadier figure.

``kvpool bench e2e`` reports it with its engine runs; ``kvpool bench stream --json`` alone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import resource
import socket
import statistics
import tempfile
import time
from typing import Any

_HEADER = 8  # bytes of the TCP side's length prefix


def _gbps(total: int, seconds: float) -> float:
    return total / seconds / 1e9


def _cpu_s() -> float:
    """CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- receivers (each in its own process) -----------------------------------------------------


def _sidecar_receiver(queue: Any, cpu_queue: Any) -> None:
    from kvpool.sidecar.server import Sidecar, SidecarConfig

    async def serve() -> None:
        folder = tempfile.mkdtemp(prefix="kvpool-bench-stream-")
        sidecar = Sidecar(SidecarConfig(local=f"unix://{folder}/sidecar.sock", metrics=""))
        queue.put((await sidecar.start())["peer"])
        while True:  # the decode side is done with a complete transfer: let it go
            await asyncio.sleep(0.01)
            for transfer in sidecar.store.transfers():
                if transfer.done:
                    sidecar.store.drop(transfer.transfer_id)
                    cpu_queue.put(_cpu_s())

    asyncio.run(serve())


def _read_into(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``conn``; False at end of stream before any byte."""
    got = 0
    while got < len(view):
        read = conn.recv_into(view[got:])
        if not read:
            if got:
                raise ConnectionError("the stream ended inside a message")
            return False
        got += read
    return True


def _tcp_receiver(queue: Any, _cpu_queue: Any) -> None:
    from kvpool.sidecar import malloc

    malloc.tune()  # as the sidecar does
    with socket.create_server(("127.0.0.1", 0)) as server:
        queue.put(server.getsockname()[1])
        while True:
            conn, _ = server.accept()
            with conn:
                started = _cpu_s()
                header = bytearray(_HEADER)
                kept = []
                while _read_into(conn, memoryview(header)):
                    message = bytearray(int.from_bytes(header, "little"))
                    _read_into(conn, memoryview(message))
                    kept.append(message)
                got = sum(map(len, kept))
                del kept
                conn.sendall(f"{got} {_cpu_s() - started}".encode())


# -- senders (this process) ------------------------------------------------------------------


def _transfer(payloads: list[bytes], count: int, transfer_id: str):
    """A complete transfer of ``count`` chunks (payloads taken in turn), as a prefill
    sidecar holds it."""
    import google_crc32c

    from kvpool.sidecar.peerwire import Chunk
    from kvpool.sidecar.proto import sidecar_pb2 as pb
    from kvpool.sidecar.store import Transfer

    transfer = Transfer(transfer_id, "bench", expires_at=time.monotonic() + 3600)
    crcs = [google_crc32c.value(p) for p in payloads]
    for layer, i in zip(range(count), itertools.cycle(range(len(payloads)))):
        key = pb.ChunkKey(layer=layer, token_start=0, token_end=1)
        transfer.add(Chunk(key=key, level="raw", payload=payloads[i], crc32c=crcs[i],
                           raw_bytes=len(payloads[i])))  # fmt: skip
    transfer.finish(pb.TransferEnd(num_tokens=1, num_layers=count, chunks=count))
    return transfer


async def _push(transport: Any, peer: str, transfer: Any) -> float:
    """Seconds to push ``transfer`` to ``peer`` (the prefill sidecar's call)."""
    started = time.perf_counter()
    chunks = await transport.push(peer, transfer.messages(600), timeout=600)
    seconds = time.perf_counter() - started
    if chunks != len(transfer.chunks):
        raise RuntimeError(f"the receiving sidecar took {chunks} of {len(transfer.chunks)} chunks")
    return seconds


def _send_tcp(port: int, payloads: list[bytes], count: int) -> tuple[float, float]:
    """Seconds to send ``count`` framed chunks and hear the receiver has them all, and
    the receiver's CPU seconds."""
    total = sum(len(payloads[i % len(payloads)]) for i in range(count))
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for i in range(count):
            payload = payloads[i % len(payloads)]
            conn.sendall(len(payload).to_bytes(_HEADER, "little"))
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        got, receiver_cpu = conn.recv(64).split()
    seconds = time.perf_counter() - started
    if int(got) != total:
        raise RuntimeError(f"the TCP receiver got {int(got)} of {total} bytes")
    return seconds, float(receiver_cpu)


def grpc_vs_tcp(mib: int = 128, repeats: int = 7, chunk_mib: float = 4) -> dict[str, Any]:
    """Throughput (GB/s, medians) of the sidecar's gRPC stream and of a TCP socket moving
    a transfer of ``mib`` MiB in ``chunk_mib`` MiB chunks, in ``repeats`` alternating pairs."""
    from kvpool.sidecar import malloc
    from kvpool.sidecar.transport import GrpcTransport

    malloc.tune()  # as the prefill sidecar does
    size = max(1, int(chunk_mib * (1 << 20)))
    count = max(1, (mib << 20) // size)
    distinct = min(count, max(2, (64 << 20) // size))  # twice the L3 cache of big CPUs
    payloads = [os.urandom(size) for _ in range(distinct)]
    total = count * size
    ctx = multiprocessing.get_context("spawn")
    queue: Any = ctx.Queue()
    cpu_queue: Any = ctx.Queue()
    receivers = []
    try:
        for target in (_sidecar_receiver, _tcp_receiver):  # one at a time: whose address is whose
            receivers.append(ctx.Process(target=target, args=(queue, cpu_queue), daemon=True))
            receivers[-1].start()
            receivers[-1].address = queue.get(timeout=60)
        peer, tcp_port = (r.address for r in receivers)

        async def pairs() -> list[dict[str, float]]:
            transport = GrpcTransport()
            try:
                runs = []
                receiver_cpu = None
                for n in range(repeats + 1):  # the first pair warms both up
                    transfer = _transfer(payloads, count, f"bench-{n}")
                    cpu = _cpu_s()
                    grpc_s = await _push(transport, peer, transfer)
                    grpc_cpu = _cpu_s() - cpu
                    dropped = await asyncio.to_thread(cpu_queue.get, timeout=60)
                    grpc_rx = dropped - receiver_cpu if receiver_cpu is not None else 0.0
                    receiver_cpu = dropped
                    cpu = _cpu_s()
                    tcp_s, tcp_rx = _send_tcp(tcp_port, payloads, count)
                    tcp_cpu = _cpu_s() - cpu
                    if n:
                        runs.append({"grpc": _gbps(total, grpc_s), "tcp": _gbps(total, tcp_s),
                                     "grpc_send": grpc_cpu, "grpc_receive": grpc_rx,
                                     "tcp_send": tcp_cpu, "tcp_receive": tcp_rx})  # fmt: skip
                return runs
            finally:
                await transport.close()

        load = os.getloadavg()[0]
        runs = asyncio.run(pairs())
    finally:
        for receiver in receivers:
            receiver.kill()

    def median(key: str, scale: float = 1.0) -> float:
        return round(statistics.median(run[key] for run in runs) * scale, 3)

    per_byte = 1e9 / total
    ratios = [run["grpc"] / run["tcp"] for run in runs]
    return {
        "grpc_gbps": median("grpc"),
        "tcp_gbps": median("tcp"),
        "grpc_vs_tcp": round(statistics.median(ratios), 3),
        "grpc_vs_tcp_runs": [round(r, 3) for r in ratios],
        "grpc_stream": {
            "mib": total >> 20, "chunk_bytes": size, "repeats": repeats,
            "load_avg_1m": round(load, 2),
            "cpu_ns_per_byte": {side: {"send": median(f"{side}_send", per_byte),
                                       "receive": median(f"{side}_receive", per_byte)}
                                for side in ("grpc", "tcp")},
        },
    }  # fmt: skip


# -- the command -------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the JSON object only")
    parser.add_argument("--mib", type=int, default=128, help="MiB of the transfer of each run")
    parser.add_argument("--chunk-mib", type=float, default=4, help="MiB per chunk")
    parser.add_argument("--repeats", type=int, default=7, help="gRPC/TCP pairs measured")


def run(args: argparse.Namespace) -> int:
    if args.mib < 1 or args.repeats < 1 or args.chunk_mib <= 0:
        raise SystemExit("kvpool bench stream: --mib, --repeats and --chunk-mib must be positive")
    result = grpc_vs_tcp(args.mib, repeats=args.repeats, chunk_mib=args.chunk_mib)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
