"""A prompt's KV over a real link, chunk by chunk, at the level a policy picks per chunk.

What the prefill sidecar does when it pushes a transfer, reduced to what the adaptive
policy needs to be driven and measured across a real (possibly shaped) network:

- ``serve``: a gRPC server (``kvpool.link.v1.Link/Stream``, bidirectional) that receives
  :class:`WireChunk` messages of the sidecar protocol, checks each CRC-32C, acknowledges it
  at once (the sender's throughput sample) and decodes it (raw or any codec level: a
  stream may mix them);
- ``send``: for each layer of a real KV cache, asks the policy (``adaptive`` or a fixed
  level) for the chunk's form under a deadline from the TTFT target, encodes it, sends it,
  and feeds the acknowledgement time back to the throughput estimator.

Run as ``python -m kvpool.sidecar.linkstream serve|send ...`` (each end in its own network
namespace in the tests and ``kvpool bench transfer``); both print JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field

import google_crc32c
import grpc
import torch

from kvpool.sidecar import adaptive, codec, realkv
from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.transport import CHANNEL_OPTIONS

SERVICE = "kvpool.link.v1.Link"
METHOD = f"/{SERVICE}/Stream"


# ---- receiver ----------------------------------------------------------------------------


def _stream(requests, context):
    """Ack each chunk on arrival (its CRC checked), then decode it."""
    context.send_initial_metadata(())  # the stream is open: the sender starts its clock
    for n, chunk in enumerate(requests, start=1):
        ok = google_crc32c.value(chunk.payload) == chunk.crc32c
        yield pb.PushReply(chunks=n if ok else 0)
        if not ok:
            context.abort(grpc.StatusCode.DATA_LOSS, f"chunk {chunk.key.layer}: CRC-32C mismatch")
        codec.decode(chunk.payload, chunk.level)


def serve(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.Server, int]:
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.stream_stream_rpc_method_handler(
            _stream, request_deserializer=pb.WireChunk.FromString,
            response_serializer=pb.PushReply.SerializeToString),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


# ---- sender ------------------------------------------------------------------------------


@dataclass
class ChunkReport:
    chunk: int
    level: str
    raw_bytes: int
    wire_bytes: int
    encode_s: float
    wire_s: float
    """Seconds from handing the chunk to the stream (or from the previous acknowledgement,
    when that came later) to the arrival of its own acknowledgement."""
    arrived_s: float
    """Seconds from the transfer's start to the chunk's acknowledgement."""
    due_s: float
    """Seconds from the transfer's start by which the chunk should have arrived."""
    encode_cpu_s: float = 0.0
    """CPU seconds the encoding took (``encode_s`` is wall time: on a busy machine the
    difference is the time other work took the core)."""

    @property
    def on_time(self) -> bool:
        return self.level != adaptive.RECOMPUTE and self.arrived_s <= self.due_s


@dataclass
class StreamReport:
    policy: str
    deadline_s: float
    total_chunks: int = 0
    """Chunks of the whole KV (after a recompute, those never sent count as not on time)."""
    chunks: list[ChunkReport] = field(default_factory=list)
    recompute: bool = False
    finished_s: float = 0.0

    @property
    def on_time(self) -> float:
        total = max(self.total_chunks, len(self.chunks))
        return sum(c.on_time for c in self.chunks) / total if total else 0.0

    @property
    def met_deadline(self) -> bool:
        return self.finished_s <= self.deadline_s

    def to_json(self) -> dict:
        return {"policy": self.policy, "deadline_s": self.deadline_s, "recompute": self.recompute,
                "finished_s": self.finished_s, "met_deadline": self.met_deadline,
                "on_time": self.on_time, "levels": [c.level for c in self.chunks],
                "chunks": [asdict(c) for c in self.chunks]}


def layer_chunks(keys, values) -> list[pb.RawChunk]:
    """One RawChunk per layer of a KV cache (the sidecar's chunk unit)."""
    from kvpool.sidecar import chunks as chunk_bytes

    out = []
    for layer, (k, v) in enumerate(zip(keys, values)):
        out.append(pb.RawChunk(
            key=pb.ChunkKey(layer=layer, token_start=0, token_end=k.shape[0]),
            dtype=chunk_bytes.dtype_name(k.dtype), width=k.shape[1],
            keys=chunk_bytes.to_bytes(k), values=chunk_bytes.to_bytes(v)))
    return out


def _budget(policy: adaptive.LevelPolicy, deadline: adaptive.TransferDeadline, raw_bytes: int,
            pending=None) -> dict:
    """The arguments of ``LevelPolicy.choose`` for the next chunk, now: its share of the
    time left, the chunk still on the wire ahead of it (bytes, and its decoding: the receiver
    acknowledges the next one after), its due instant, the rest, the fraction sent."""
    now = time.monotonic()
    queued = pending[0] if pending is not None else None
    return {"budget_s": deadline.chunk_budget(raw_bytes, now),
            "queued_bytes": queued.wire_bytes if queued else 0,
            "queued_decode_s": policy.decode_s(queued.level, queued.raw_bytes) if queued else 0.0,
            "due_s": deadline.due(raw_bytes) - now, "rest": deadline.rest(now),
            "progress": deadline.progress()}


def _read_acks(acks, arrivals: queue.Queue) -> None:
    """Put each acknowledgement on ``arrivals`` with the instants it came (``perf_counter``,
    ``monotonic``) as it comes, then None (or the stream's error): the sender may be busy
    encoding the next chunk when one comes, and that is no time on the wire."""
    try:
        for ack in acks:
            arrivals.put((ack, time.perf_counter(), time.monotonic()))
    except grpc.RpcError as exc:
        arrivals.put(exc)
        return
    arrivals.put(None)


def send(target: str, raw_chunks: list[pb.RawChunk], policy: adaptive.LevelPolicy | str,
         deadline_s: float, *, on_chunk=None, hold=None, timeout: float = 120.0,
         reserve: float = 0.05) -> StreamReport:
    """Stream ``raw_chunks`` to a ``serve`` end at ``target`` within ``deadline_s``.

    ``policy`` is a :class:`~kvpool.sidecar.adaptive.LevelPolicy` (per-chunk choice, fed
    with every acknowledgement) or a fixed level name. A ``recompute`` decision ends the
    stream: decode would run the prefill itself. ``on_chunk(report)`` is called per chunk.
    ``hold(report)`` is called after each acknowledgement, before the next chunk goes out;
    the time it takes is left out of the transfer's clock (a caller that changes the link
    there knows which chunks crossed the old link and which the new one). The policy's
    schedule ends ``reserve`` of ``deadline_s`` early; the report's due times do not.
    """
    name = policy if isinstance(policy, str) else policy.name
    report = StreamReport(name, deadline_s, total_chunks=len(raw_chunks))
    total = sum(len(c.keys) + len(c.values) for c in raw_chunks)
    num_layers = max((c.key.layer for c in raw_chunks), default=-1) + 1
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=timeout)  # connecting is not the link
    outbox: list[pb.WireChunk | None] = []
    ready = threading.Condition()

    def requests():
        for i in itertools.count():
            with ready:
                ready.wait_for(lambda i=i: len(outbox) > i)
                item = outbox[i]
            if item is None:
                return
            yield item

    reader = None
    try:
        acks = channel.stream_stream(
            METHOD, request_serializer=pb.WireChunk.SerializeToString,
            response_deserializer=pb.PushReply.FromString)(requests(), timeout=timeout)
        acks.initial_metadata()  # nor is opening the stream (else the first sample is slow)
        arrivals: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_acks, args=(acks, arrivals), daemon=True)
        reader.start()
        start = time.monotonic()
        # the policy plans to finish ``reserve`` of the time early (a stall of a busy machine
        # at the last chunk does not make the whole KV late); a recompute only pays once the
        # KV would be later than a fifth of the deadline
        deadline = adaptive.TransferDeadline(start + deadline_s * (1 - reserve), total,
                                             start=start, grace_s=(0.2 + reserve) * deadline_s)
        sent_raw = 0
        pending: tuple | None = None  # the chunk on the wire: (report, handoff time)
        last_ack = 0.0

        def settle() -> None:
            nonlocal last_ack, start
            chunk, handoff = pending
            got = arrivals.get(timeout=timeout)
            if isinstance(got, BaseException):
                raise got
            if got is None:
                raise RuntimeError(f"the stream ended before chunk {chunk.chunk}'s acknowledgement")
            ack, now, arrived = got
            if ack.chunks != chunk.chunk + 1:
                raise RuntimeError(f"chunk {chunk.chunk} was refused by the receiver")
            chunk.wire_s = now - max(handoff, last_ack)
            chunk.arrived_s = arrived - start
            last_ack = now
            if not isinstance(policy, str):
                policy.estimator.observe(chunk.wire_bytes, chunk.wire_s, at=chunk.arrived_s)
            report.chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
            if hold is not None:
                t0 = time.monotonic()
                hold(chunk)
                held = time.monotonic() - t0
                start += held
                deadline.shift(held)

        for i, raw in enumerate(raw_chunks):
            raw_bytes = len(raw.keys) + len(raw.values)
            sent_raw += raw_bytes
            due = deadline_s * sent_raw / total
            decision = None
            if isinstance(policy, str):
                level = policy
            else:
                decision = policy.choose(raw_bytes, **_budget(policy, deadline, raw_bytes, pending))
                level = decision.level
            if level == adaptive.RECOMPUTE:
                report.recompute = True
                if pending is not None:
                    settle()
                    pending = None
                report.chunks.append(ChunkReport(i, level, raw_bytes, 0, 0.0, 0.0,
                                                 time.monotonic() - start, due))
                break
            c0, t0 = time.thread_time(), time.perf_counter()
            payload = codec.encode(raw, level, num_layers)  # overlaps the previous chunk's wire time
            t1, c1 = time.perf_counter(), time.thread_time()
            if pending is not None:
                settle()
                if decision is not None:  # the acknowledgement may show the link slowed down
                    revised = policy.revise(decision, raw_bytes,
                                            **_budget(policy, deadline, raw_bytes))
                    if revised is not None:
                        level = revised.level
                        c0, t0 = time.thread_time(), time.perf_counter()
                        payload = codec.encode(raw, level, num_layers)
                        t1, c1 = time.perf_counter(), time.thread_time()
            if not isinstance(policy, str) and level != adaptive.RAW:
                policy.model.observe(level, raw_bytes, len(payload), t1 - t0,
                                     encode_cpu_s=c1 - c0)
            with ready:
                outbox.append(pb.WireChunk(key=raw.key, level=level, payload=payload,
                                           crc32c=google_crc32c.value(payload),
                                           raw_bytes=raw_bytes))
                ready.notify_all()
            deadline.sent(raw_bytes)
            pending = (ChunkReport(i, level, raw_bytes, len(payload), t1 - t0, 0.0, 0.0, due,
                                   c1 - c0), time.perf_counter())
        if pending is not None:
            settle()
        with ready:
            outbox.append(None)
            ready.notify_all()
        reader.join(timeout)
    finally:
        channel.close()
        if reader is not None:
            reader.join(timeout)
    report.finished_s = time.monotonic() - start
    return report


# ---- command line ------------------------------------------------------------------------


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpool.sidecar.linkstream",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("send")
    c.add_argument("--target", required=True)
    c.add_argument("--tokens", type=int, default=1024)
    c.add_argument("--policy", default="adaptive", help="adaptive, raw or a codec level")
    c.add_argument("--deadline", type=float, required=True, help="seconds for the whole KV")
    c.add_argument("--initial-mbps", type=float,
                   help="link rate assumed before the first measurement (adaptive)")
    c.add_argument("--wait", action="store_true",
                   help="read one line on stdin before sending (lets the caller get ready)")
    c.add_argument("--hold-after", type=int, metavar="N",
                   help="after N chunks are acknowledged, stop the clock and read one line on "
                        "stdin before sending on (lets the caller change the link there)")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        server, port = serve(args.host, args.port)
        _emit({"event": "ready", "port": port})
        server.wait_for_termination()
        return 0
    keys, values = realkv.prompt_kv(args.tokens)
    raw_chunks = layer_chunks(keys, values)
    if args.policy == "adaptive":
        from kvpool import kernels

        sample = kernels.KVCache(keys=[keys[0]], values=[values[0]])
        model = adaptive.CodecModel.calibrate(lambda kv, lv: kernels.encode(kv, level=lv),
                                              kernels.decode, sample, kernels.LEVELS,
                                              repeats=3)
        initial = args.initial_mbps * 1e6 / 8 if args.initial_mbps else None
        policy: adaptive.LevelPolicy | str = adaptive.LevelPolicy(
            model, adaptive.ThroughputEstimator(initial_bps=initial), overlap=True, margin=0.2)
    else:
        policy = codec.check_level(args.policy)
    _emit({"event": "ready", "chunks": len(raw_chunks)})
    if args.wait:
        sys.stdin.readline()
    def hold(chunk: ChunkReport) -> None:
        if chunk.chunk + 1 == args.hold_after:
            sys.stdin.readline()

    report = send(args.target, raw_chunks, policy, args.deadline,
                  on_chunk=lambda ch: _emit({"event": "chunk", **asdict(ch)}),
                  hold=hold if args.hold_after else None)
    _emit({"event": "done", **report.to_json()})
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
