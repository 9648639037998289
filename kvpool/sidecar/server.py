"""``kvpool sidecar``: the KV transfer sidecar beside one vLLM worker.

It serves two gRPC services (kvpool/sidecar/proto/sidecar.proto):

* ``Local`` on a unix socket, for its vLLM KV connector (kvpool.sidecar.connector):
  ``Put`` takes one layer's KV of a prefill step and encodes it at once (raw or a codec
  level, per chunk), ``Seal`` closes the transfer, ``Load`` streams a transfer's decoded
  chunks back as they arrive: as bytes, or, with a connector that maps this sidecar's
  shared-memory directory (``--shm-dir``, :mod:`kvpool.sidecar.shm`), as descriptors of
  the regions they were decoded into; ``Release`` gives such a transfer's memory back.
* ``Peer`` on TCP, for the other sidecars: ``Pull`` streams a transfer held here as it is
  produced; ``Push`` receives one that a prefill sidecar streams here on its own.

Both carry the standard gRPC health service. The Peer service runs over plaintext or
mutual TLS (``--tls-dir``: a mounted Secret, :mod:`kvpool.sidecar.tls`); chunk payloads
travel in the gRPC stream or through NIXL (``--transport nixl``: preferred, used with every
peer that has it too; gRPC with the others). Each sidecar process is an instance (random
at start) that travels with its transfers: a pull, push or load naming another instance
is refused (reason ``peer_restarted``) and decode recomputes. With ``--level
adaptive`` each chunk's level is chosen from the throughput measured on the peer stream and
the TTFT target (:mod:`kvpool.sidecar.adaptive`). Prometheus metrics and the transfer
health summary (``/transfer/health``, :mod:`kvpool.sidecar.health`) are served over HTTP;
logs are one JSON object per line on stderr. Once listening, the sidecar prints one JSON line
on stdout (``{"event": "ready", "local": ..., "peer": ..., "metrics": ..., "instance": ...,
"transports": [...]}``; also written
to ``--ready-file``) so that whoever started it learns the ports it picked.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import grpc
import numpy as np
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvpool.sidecar import adaptive, codec, malloc, peerwire, shm, tls
from kvpool.sidecar import health as transfer_health
from kvpool.sidecar.metrics import SidecarMetrics
from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.proto import sidecar_pb2_grpc as pb_grpc
from kvpool.sidecar.store import Transfer, TransferFailed, TransferStore
from kvpool.sidecar.transport import (
    CHANNEL_OPTIONS,
    GRPC,
    NIXL,
    PEER_RESTARTED,
    REASON_KEY,
    TRANSPORTS,
    GrpcTransport,
    PeerRestarted,
    PeerTransport,
    TransportError,
    negotiate,
    new_instance,
    refusal_metadata,
)

log = logging.getLogger("kvpool.sidecar")


@dataclass
class SidecarConfig:
    """What one sidecar listens on and how it treats transfers."""

    local: str
    """Address of the Local service for the connector, e.g. ``unix:///run/kvpool/sidecar.sock``."""
    peer: str = "127.0.0.1:0"
    """host:port of the Peer service (port 0: pick a free one)."""
    advertise: str = ""
    """Peer address that other sidecars use to reach this one; default: the bound ``peer``."""
    metrics: str = "127.0.0.1:0"
    """host:port of the Prometheus endpoint; empty: none."""
    level: str = "raw"
    """Level of chunks whose connector names none: ``raw`` or a codec level."""
    lease_s: float = 120.0
    """Seconds a transfer is held at most, delivered or not: no KV stays longer."""
    transfer_timeout_s: float = 30.0
    """Seconds a reader waits for a transfer to complete (also the peer calls' deadline)."""
    codec_threads: int = 2
    """Threads that encode and decode chunks (the codec releases the GIL)."""
    transport: str = GRPC
    """How payloads should cross to the peer: ``grpc`` (in the Peer stream) or ``nixl``
    (preferred: used with peers that have NIXL too, gRPC with the others)."""
    tls_dir: str = ""
    """Folder of a mounted Secret with ca.crt, tls.crt, tls.key: mutual TLS on the Peer
    service and channels. Empty: plaintext."""
    ttft_target_s: float = 2.0
    """With ``level=adaptive``: seconds from a transfer's first chunk by which all of its
    KV should be in decode."""
    decode_reserve_s: float = 0.2
    """With ``level=adaptive``: of the TTFT target, what decode needs after the KV is in."""
    nixl_slots: int = 64
    """NIXL transport: registered buffers for chunks in flight (memory is bounded by
    slots x slot size; a full pool pushes back on the producer)."""
    nixl_slot_bytes: int = 16 << 20
    """NIXL transport: the largest encoded chunk."""
    shm_dir: str = field(default_factory=shm.default_dir)
    """Memory-backed directory shared with the connector, where decoded chunks are handed
    over in place (:mod:`kvpool.sidecar.shm`); ``off`` or empty: bytes over the socket."""
    shm_max_bytes: int = 1 << 30
    """The most shared memory held at once (keep it under the directory's size limit);
    chunks beyond it go as bytes."""
    profile: str = ""
    """A codec profile file of the model (``kvpool profile``): lossy chunks of a model of its
    shape code with it (rate-distortion bins, context tables, no tables in the chunk); the
    sidecars of a pair need the same one. Empty: chunks carry their own tables."""


CANCEL_GRACE_S = 0.5
"""How long a Push handler whose request stream ended without the transfer's end waits
for the call's cancellation before it blames the sender for closing early."""

ADAPTIVE = "adaptive"
"""The level that lets :mod:`kvpool.sidecar.adaptive` pick one per chunk."""

DECODE_RECOMPUTES = ("deadline", "push", "pull", PEER_RESTARTED)
"""Reasons a prefill-side transfer failed for which decode recomputes the request (it
cannot arrive in time, or its reader is gone): the producer's later chunks are accepted
and dropped, not refused."""


def checksum(payload: bytes | memoryview) -> int:
    """CRC-32C of a chunk's payload (bytes, or a view of a received message's)."""
    return google_crc32c.value(np.frombuffer(payload, dtype=np.uint8))


def unwanted(transfer: Transfer) -> bool:
    """Whether a prefill-side transfer failed in a way that makes decode recompute it: its
    producer's later chunks are accepted and dropped."""
    return transfer.error is not None and transfer.error.reason in DECODE_RECOMPUTES


async def refuse_restarted(context: grpc.aio.ServicerContext, message: str) -> None:
    """End a call that names another instance of a sidecar (raises, as ``abort`` does)."""
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{PEER_RESTARTED}: {message}",
                        trailing_metadata=refusal_metadata())


def load_reply(chunk: peerwire.Chunk, profile=None) -> pb.LoadReply:
    """One encoded chunk decoded into the reply ``Load`` sends its connector (built in a
    codec thread: the copies stay off the event loop)."""
    reply = pb.LoadReply(chunk=codec.decode(chunk.payload, chunk.level, profile))
    reply.chunk.key.CopyFrom(chunk.key)
    return reply


def shared_reply(segment: shm.Segment, offset: int, chunk: peerwire.Chunk,
                 profile=None) -> pb.LoadReply:
    """One encoded chunk decoded into its region of a shared-memory segment, and the
    descriptor ``Load`` sends in its place (as bytes when the directory is full)."""
    try:
        dtype, width = segment.write(offset, chunk.raw_bytes, lambda region: codec.decode_into(
            chunk.payload, chunk.level, region, profile))
    except shm.ShmFull:
        return load_reply(chunk, profile)
    return pb.LoadReply(shared=pb.SharedChunk(
        key=chunk.key, dtype=dtype, width=width, segment=segment.name, offset=offset,
        length=chunk.raw_bytes))


class Sidecar:
    """One sidecar: its transfers, its two gRPC servers and its metrics."""

    def __init__(self, config: SidecarConfig) -> None:
        if config.level != ADAPTIVE:
            codec.check_level(config.level)
        if config.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {config.transport!r}: grpc or nixl")
        self.config = config
        self.instance = new_instance()
        self.profile = codec.load_profile(config.profile) if config.profile else None
        self.tls = tls.load_bundle(config.tls_dir) if config.tls_dir else None
        self.grpc = GrpcTransport(tls.channel_credentials(self.tls) if self.tls else None)
        self.nixl = self._start_nixl() if config.transport == NIXL else None
        self.transports = (GRPC, NIXL) if self.nixl is not None else (GRPC,)
        """Payload transports this sidecar can use (advertised to its peers)."""
        self._fell_back: set[tuple[str, str]] = set()
        self.store = TransferStore(config.lease_s)
        self.metrics = SidecarMetrics()
        self.metrics.held.set_function(lambda: len(self.store))
        self.metrics.held_bytes.set_function(
            lambda: self.store.held_bytes + (self.shm.held_bytes if self.shm is not None else 0))
        self.shm: shm.SegmentDir | None = None
        self._reader_maps = True
        """Whether the connector maps shared memory (its last Load said so; assumed at first)."""
        self.health = transfer_health.TransferHealth(role="sidecar", registry=self.metrics.registry)
        self.policy: adaptive.LevelPolicy | None = None
        self._layers: dict[str, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            config.codec_threads, thread_name_prefix="kvpool-codec"
        )
        self._tasks: set[asyncio.Task] = set()
        self._pushing: set[str] = set()
        self._servers: list[grpc.aio.Server] = []
        self._metrics_server = None
        self.peer_address = ""
        self.metrics_address = ""

    def _start_nixl(self) -> PeerTransport | None:
        """NIXL endpoints for ``--transport nixl``, or None (logged) when NIXL cannot run
        here: this sidecar then advertises gRPC only, and its transfers take gRPC."""
        c = self.config
        try:
            from kvpool.sidecar.transport_nixl import NixlPeerTransport

            return NixlPeerTransport(self.grpc, slots=c.nixl_slots, slot_bytes=c.nixl_slot_bytes,
                                     lease_s=c.lease_s, timeout_s=c.transfer_timeout_s)
        except Exception as exc:  # noqa: BLE001 - ImportError, TransportError, NIXL's own
            log.warning("NIXL unavailable: this sidecar moves payloads over gRPC only",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
            return None

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> dict[str, str]:
        """Listen on every address; returns where (``local``, ``peer``, ``metrics``)."""
        malloc.tune()  # chunks are MiB-sized: reuse their memory instead of faulting it in
        self._open_shm()
        options = CHANNEL_OPTIONS
        health_servicer = health.aio.HealthServicer()
        local = grpc.aio.server(options=options)
        pb_grpc.add_LocalServicer_to_server(LocalService(self), local)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, local)
        if not local.add_insecure_port(self.config.local):
            raise OSError(f"cannot listen on {self.config.local}")
        peer = grpc.aio.server(options=options)
        peer.add_generic_rpc_handlers((peerwire.handler(PeerService(self)),))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, peer)
        host, _, _ = self.config.peer.rpartition(":")
        if self.tls is None:
            port = peer.add_insecure_port(self.config.peer)
        else:
            port = peer.add_secure_port(self.config.peer, tls.server_credentials(self.tls))
        if not port:
            raise OSError(f"cannot listen on {self.config.peer}")
        self.peer_address = self.config.advertise or f"{host}:{port}"
        self._servers = [local, peer]
        for server in self._servers:
            await server.start()
        if self.config.metrics:
            m_host, _, m_port = self.config.metrics.rpartition(":")
            app = web.Application()
            transfer_health.add_routes(app, self.health)  # /metrics: the whole registry
            self._metrics_server = web.AppRunner(app, access_log=None)
            await self._metrics_server.setup()
            site = web.TCPSite(self._metrics_server, m_host, int(m_port))
            await site.start()
            bound = site._server.sockets[0].getsockname()[1]
            self.metrics_address = f"{m_host}:{bound}"
        for service in ("", "kvpool.sidecar.v1.Local", "kvpool.sidecar.v1.Peer"):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._spawn(self._expire_forever())
        return {"local": self.config.local, "peer": self.peer_address,
                "metrics": self.metrics_address, "instance": self.instance}

    async def stop(self, grace: float = 1.0) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        await self.grpc.close()
        if self.nixl is not None:
            await self.nixl.close()
        if self._metrics_server is not None:
            await self._metrics_server.cleanup()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.shm is not None:
            self.shm.close()
            self.shm = None

    def _open_shm(self) -> None:
        """Set up the shared-memory directory, or go without it (with a warning)."""
        directory = self.config.shm_dir
        if not shm.enabled(directory):
            return
        try:
            self.shm = shm.SegmentDir(directory, self.config.shm_max_bytes, self.config.lease_s)
        except OSError as exc:
            log.warning("no shared memory with the connector: chunks go over the socket",
                        extra={"shm_dir": directory, "error": str(exc)})

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _expire_forever(self) -> None:
        while True:
            gone = self.store.expire()
            if gone:
                self.metrics.expired.inc(len(gone))
                for transfer in gone:
                    log.info("lease expired", extra={"transfer": transfer.transfer_id})
            if self.shm is not None:
                for segment in self.shm.expire():
                    log.info("shared-memory segment expired unreleased",
                             extra={"transfer": segment.transfer_id, "bytes": segment.size})
                self.shm.sweep_put_buffers()
            await asyncio.sleep(min(1.0, self.config.lease_s / 4))

    # ---- work shared by the services ------------------------------------------------------

    def loaded(self, transfer: Transfer, transfer_id: str, start: float) -> None:
        """Count a transfer whose every chunk went to the connector (decode side)."""
        self.metrics.transfers.labels("decode", "loaded").inc()
        self.metrics.chunk_latency.observe(time.perf_counter() - start)
        self.health.transfer_done(transfer.raw_bytes, transfer.wire_bytes,
                                  time.perf_counter() - start)
        log.info("transfer loaded", extra={
            "transfer": transfer_id, "chunks": len(transfer.chunks),
            "raw_bytes": transfer.raw_bytes, "wire_bytes": transfer.wire_bytes,
            "seconds": round(time.perf_counter() - transfer.created_at, 4)})

    async def run_codec(self, op: str, fn, *args):
        start = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        self.metrics.codec_seconds.labels(op).observe(time.perf_counter() - start)
        return result

    # ---- adaptive levels ----------------------------------------------------------------

    async def choose_level(self, transfer: Transfer, raw: pb.RawChunk) -> str:
        """The level of one chunk under ``--level adaptive`` (calibrating the codec model
        on the first chunk): raw, a codec level, or adaptive.RECOMPUTE."""
        if self.policy is None:
            from kvpool import kernels

            sample = codec.to_kvcache(raw)
            model = await self.run_codec(
                "calibrate", adaptive.CodecModel.calibrate,
                lambda kv, level: kernels.encode(kv, level=level), kernels.decode, sample,
                kernels.LEVELS)
            self.policy = adaptive.LevelPolicy(
                model, overlap=True, name="sidecar",
                on_decision=lambda d: self.health.chunk(d.level))
        raw_bytes = len(raw.keys) + len(raw.values)
        deadline = adaptive.TransferDeadline(
            transfer.created_at + self.config.ttft_target_s - self.config.decode_reserve_s,
            total_raw_bytes=transfer.raw_bytes + raw_bytes * self._chunks_left(transfer, raw))
        deadline.sent(transfer.raw_bytes)
        return self.policy.choose(raw_bytes, deadline.chunk_budget(raw_bytes)).level

    def _chunks_left(self, transfer: Transfer, raw: pb.RawChunk) -> int:
        """This chunk and the rest of its prefill step (layers above it), as far as the
        layer count of the model is known from earlier transfers."""
        layers = self._layers.get(transfer.model, 0)
        return max(1, layers - raw.key.layer)

    async def measured(self, messages):
        """Pass a peer stream through, timing how long the transport takes to accept each
        chunk: the throughput samples of the adaptive policy."""
        async for message in messages:
            start = time.perf_counter()
            yield message
            if self.policy is not None and message.chunk is not None:
                self.policy.estimator.observe(
                    len(message.chunk.payload) or len(message.chunk.nixl_location),
                    time.perf_counter() - start)

    # ---- transports and instances --------------------------------------------------------

    def chose(self, side: str, transport: str, peer: str, peer_instance: str) -> None:
        """Count the payload transport of one transfer. A sidecar that prefers NIXL and
        got gRPC counts a fallback, and logs it once per peer instance."""
        self.metrics.transports.labels(side, transport).inc()
        fallback = self.config.transport == NIXL and transport == GRPC
        self.health.transport(transport, fallback=fallback)
        if not fallback:
            return
        reason = "peer_lacks_nixl" if self.nixl is not None else "nixl_unavailable"
        self.metrics.transport_fallbacks.labels(side, reason).inc()
        if (peer, peer_instance) not in self._fell_back:
            self._fell_back.add((peer, peer_instance))
            log.warning("transport fallback: gRPC instead of NIXL", extra={
                "peer": peer, "peer_instance": peer_instance, "reason": reason})

    def sending(self, transport: str):
        """The hook that puts a transfer's payloads on a stream of ``transport``."""
        return self.nixl.outgoing if transport == NIXL else self.grpc.outgoing

    async def incoming(self, message: peerwire.Message) -> peerwire.Message:
        """A received message with its payload in place (read through NIXL when the
        chunk says where it lies)."""
        if self.nixl is not None:
            return await self.nixl.incoming(message)
        if message.chunk is not None and message.chunk.nixl_location:
            raise TransportError("the peer sent a chunk through NIXL; this sidecar has no NIXL")
        return message

    async def stamped(self, messages, transport: str, receiver: str = ""):
        """A transfer's stream whose header names this instance, the payload transport
        and (pushes) the receiver's instance."""
        async for message in messages:
            if message.header is not None:
                message.header.instance = self.instance
                message.header.transport = transport
                message.header.receiver_instance = receiver
            yield message

    def start_push(self, transfer: Transfer, peer: str) -> None:
        """Stream ``transfer`` to ``peer`` as it is produced (once per transfer; never a
        transfer that has failed, e.g. whose push failed already)."""
        if transfer.transfer_id in self._pushing or transfer.error is not None:
            return
        self._pushing.add(transfer.transfer_id)
        self._spawn(self._push(transfer, peer))

    async def _push(self, transfer: Transfer, peer: str) -> None:
        timeout = self.config.transfer_timeout_s
        try:
            hello = await self.grpc.hello(peer, timeout=timeout)
            chosen = negotiate(self.transports, hello.transports)
            self.chose("prefill", chosen, peer, hello.instance)
            messages = self.stamped(transfer.messages(timeout, end_on_failure=True), chosen,
                                    receiver=hello.instance)
            chunks = await self.grpc.push(peer, self.sending(chosen)(self.measured(messages)),
                                          timeout=timeout)
            if transfer.error is not None:  # the stream ended with a failed end
                raise transfer.error
        except (TransportError, TransferFailed) as exc:
            # Decode recomputes (or is gone): what is held here is of no use any more.
            reason = PEER_RESTARTED if isinstance(exc, PeerRestarted) else "push"
            transfer.fail(reason, f"the push to {peer} failed: {exc}")
            self.metrics.failures.labels("prefill", reason).inc()
            log.warning("push failed", extra={"transfer": transfer.transfer_id, "peer": peer,
                                              "reason": reason, "error": str(exc)})
        else:
            self.metrics.wire_bytes.labels("sent").inc(transfer.wire_bytes)
            log.info("pushed", extra={"transfer": transfer.transfer_id, "peer": peer,
                                      "chunks": chunks, "wire_bytes": transfer.wire_bytes})
        finally:
            self._pushing.discard(transfer.transfer_id)

    def receive(self, transfer: Transfer, message: peerwire.Message, peer: str) -> None:
        """Add one message from the stream of ``peer`` to ``transfer``, checking its
        header's instance and chunk checksums."""
        kind = message.kind
        if kind == "header":
            header = message.header
            if header.transfer_id != transfer.transfer_id:
                transfer.fail("peer", f"stream carries transfer {header.transfer_id}")
            elif not transfer.claim_peer(header.instance):
                transfer.fail(PEER_RESTARTED, f"{peer} is sidecar instance {header.instance}, "
                              f"the transfer is of instance {transfer.peer_instance}")
            else:
                self.chose("decode", header.transport or GRPC, peer, header.instance)
        elif kind == "chunk":
            chunk = message.chunk
            if checksum(chunk.payload) != chunk.crc32c:
                transfer.fail("checksum", f"chunk layer {chunk.key.layer} tokens "
                              f"[{chunk.key.token_start}, {chunk.key.token_end}) is corrupt")
                return
            self.metrics.wire_bytes.labels("received").inc(len(chunk.payload))
            transfer.add(chunk)
            self._predecode(transfer, len(transfer.chunks) - 1, chunk)
        elif kind == "end":
            transfer.finish(message.end)

    def _predecode(self, transfer: Transfer, index: int, chunk: peerwire.Chunk) -> None:
        """Start decoding a received chunk at once, in the codec threads: the reader
        (``Load``, once decode asks for the KV) then finds its reply ready, and decoding
        overlaps the transfer instead of following it."""
        future = asyncio.ensure_future(self.decode(transfer, chunk))
        # a transfer that fails or is dropped unread leaves its decodings unawaited
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        transfer.decoded[index] = future

    async def load_reply(self, transfer: Transfer, index: int, chunk: peerwire.Chunk
                         ) -> pb.LoadReply:
        """Chunk ``index`` of ``transfer`` decoded as a Load reply (started on receipt, or
        now)."""
        future = transfer.decoded.pop(index, None)
        if future is not None:
            return await future
        return await self.decode(transfer, chunk)

    async def decode(self, transfer: Transfer, chunk: peerwire.Chunk) -> pb.LoadReply:
        """Decode a chunk for Load: into the transfer's shared-memory segment while the
        connector maps them (the region is reserved here, in order), else as bytes."""
        if (self.shm is not None and self._reader_maps and chunk.raw_bytes
                and transfer.error is None):
            try:
                if transfer.segment is None:
                    transfer.segment = self.shm.create(transfer.transfer_id)
                offset = transfer.segment.reserve(chunk.raw_bytes)
            except (shm.ShmFull, OSError) as exc:
                log.debug("chunk goes as bytes", extra={"transfer": transfer.transfer_id,
                                                        "reason": str(exc)})
            else:
                return await self.run_codec("decode", shared_reply, transfer.segment, offset,
                                            chunk, self.profile)
        return await self.run_codec("decode", load_reply, chunk, self.profile)

    async def pull(self, transfer: Transfer, peer: str) -> None:
        """Fill ``transfer`` from the sidecar at ``peer``."""
        request = pb.PullRequest(transfer_id=transfer.transfer_id, model=transfer.model,
                                 instance=transfer.peer_instance, transports=self.transports)
        try:
            async for message in self.grpc.pull(
                    peer, request, timeout=self.config.transfer_timeout_s):
                self.receive(transfer, await self.incoming(message), peer)
                if transfer.done:
                    break
            transfer.fail("peer", f"the stream from {peer} ended early")
        except PeerRestarted as exc:
            transfer.fail(PEER_RESTARTED, str(exc))
        except TransportError as exc:
            transfer.fail("timeout" if isinstance(exc, TimeoutError) else "peer", str(exc))
        except TransferFailed as exc:  # a chunk arrived after the transfer closed
            transfer.fail(exc.reason, str(exc))


class LocalService(pb_grpc.LocalServicer):
    """The connector's API (unix socket)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoReply:
        s = self.sidecar
        return pb.InfoReply(peer=s.peer_address, level=s.config.level, levels=codec.levels(),
                            instance=s.instance, transports=s.transports,
                            **(s.shm.info() if s.shm is not None else {}))

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseReply:
        s = self.sidecar
        return pb.ReleaseReply(bytes=s.shm.release(request.transfer_id) if s.shm is not None else 0)

    async def Put(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutReply:
        s = self.sidecar
        level = request.level or s.config.level
        raw = request.chunk
        if request.HasField("shared"):
            if s.shm is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "this sidecar has no shared memory: send the bytes")
            try:
                raw = await s.run_codec("read", s.shm.read_put, request.shared)
            except shm.ShmError as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        try:
            transfer = s.store.open(request.transfer_id, request.model)
            if unwanted(transfer):
                return pb.PutReply(wire_bytes=0)  # the rest is not wanted: dropped
            if level == ADAPTIVE:
                level = await s.choose_level(transfer, raw)
                if level == adaptive.RECOMPUTE:
                    transfer.fail("deadline", "its KV cannot reach decode before the TTFT target")
                    s.health.recompute_chosen("deadline")
                    log.info("transfer left to recompute", extra={"transfer": transfer.transfer_id})
                    if request.push_to:
                        s.start_push(transfer, request.push_to)
                    return pb.PutReply(wire_bytes=0)
            codec.check_level(level)
            payload = await s.run_codec("encode", codec.encode, raw, level,
                                             request.num_layers, s.profile)
            if level != codec.RAW and len(payload) >= len(raw.keys) + len(raw.values):
                # Too few tokens for the codec to pay (its exact first rows and tables):
                # the chunk goes as it is; the decode side reads each chunk's own level.
                level, payload = codec.RAW, codec.encode(raw, codec.RAW)
            if unwanted(transfer):  # it failed while this chunk was encoded
                return pb.PutReply(wire_bytes=0)
            key = pb.ChunkKey()
            key.CopyFrom(raw.key)  # not a view: it would keep the whole request alive
            transfer.add(peerwire.Chunk(
                key=key, level=level, payload=payload, crc32c=checksum(payload),
                raw_bytes=len(raw.keys) + len(raw.values),
            ))
        except (ValueError, TransferFailed) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        s.metrics.chunks.labels("encoded", level).inc()
        s.metrics.raw_bytes.labels("encoded").inc(len(raw.keys) + len(raw.values))
        s.metrics.wire_bytes.labels("encoded").inc(len(payload))
        if request.push_to:
            s.start_push(transfer, request.push_to)
        return pb.PutReply(wire_bytes=len(payload))

    async def Seal(self, request: pb.SealRequest, context: grpc.aio.ServicerContext) -> pb.SealReply:
        s = self.sidecar
        try:
            transfer = s.store.open(request.transfer_id, request.model)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        transfer.finish(pb.TransferEnd(
            num_tokens=request.num_tokens, num_layers=request.num_layers,
            chunks=len(transfer.chunks), failed=request.failed,
        ))
        if request.push_to:
            s.start_push(transfer, request.push_to)
        if request.num_layers:
            s._layers[transfer.model] = request.num_layers
        outcome = "failed" if request.failed else "sealed"
        s.metrics.transfers.labels("prefill", outcome).inc()
        log.info("transfer " + outcome, extra={
            "transfer": transfer.transfer_id, "tokens": request.num_tokens,
            "chunks": len(transfer.chunks), "raw_bytes": transfer.raw_bytes,
            "wire_bytes": transfer.wire_bytes})
        return pb.SealReply(raw_bytes=transfer.raw_bytes, wire_bytes=transfer.wire_bytes,
                            chunks=len(transfer.chunks))

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext):
        s = self.sidecar
        transfer = s.store.get(request.transfer_id)
        try:
            if transfer is None:
                if not request.expect_push and not request.peer:
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"no transfer {request.transfer_id} and no peer to pull from")
                transfer = s.store.open(request.transfer_id, request.model)
                transfer.claim_peer(request.peer_instance)
                if not request.expect_push:
                    s._spawn(s.pull(transfer, request.peer))
            elif not transfer.claim_peer(request.peer_instance):
                transfer.fail(PEER_RESTARTED, f"it came from sidecar instance "
                              f"{transfer.peer_instance}, the request names instance "
                              f"{request.peer_instance}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        start = time.perf_counter()
        index = -1
        delivered = False
        if s.shm is not None:
            s._reader_maps = request.shared_memory
        try:
            async for item in transfer.follow(s.config.transfer_timeout_s):
                index += 1
                if isinstance(item, pb.TransferEnd):
                    # Counted before the last reply: the connector hangs up as soon as it
                    # has it, which may close this stream at the yield.
                    s.loaded(transfer, request.transfer_id, start)
                    delivered = True
                    yield pb.LoadReply(end=item)
                    break
                if item.key.token_end <= request.first_token:
                    transfer.decoded.pop(index, None)
                    continue
                reply = await s.load_reply(transfer, index, item)
                if reply.WhichOneof("item") == "shared" and not request.shared_memory:
                    if transfer.segment is None:
                        raise TransferFailed("dropped", "its shared memory was released")
                    reply = pb.LoadReply(chunk=shm.read_back(transfer.segment, reply.shared))
                path = "shm" if reply.WhichOneof("item") == "shared" else "bytes"
                nbytes = (reply.shared.length if path == "shm"
                          else len(reply.chunk.keys) + len(reply.chunk.values))
                s.health.chunk(item.level)
                s.metrics.chunks.labels("decoded", item.level).inc()
                s.metrics.local_chunks.labels(path).inc()
                s.metrics.raw_bytes.labels("decoded").inc(nbytes)
                yield reply
        except (TransferFailed, codec.ChunkCodecError) as exc:
            reason = exc.reason  # the transfer's, or the codec's: codec, profile_mismatch
            s.metrics.failures.labels("decode", reason).inc()
            s.metrics.transfers.labels("decode", "failed").inc()
            s.health.transfer_failed(reason)
            log.warning("load failed", extra={"transfer": request.transfer_id,
                                              "reason": reason, "error": str(exc)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{reason}: {exc}",
                                trailing_metadata=((REASON_KEY, reason),))
        finally:
            if delivered and request.shared_memory:
                # The connector still reads the segment: it goes on Release, or at its lease.
                transfer.segment = None
            s.store.drop(request.transfer_id)


class PeerService(pb_grpc.PeerServicer):
    """The other sidecars' API (TCP)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    async def Hello(self, request: pb.HelloRequest, context) -> pb.HelloReply:
        s = self.sidecar
        return pb.HelloReply(instance=s.instance, transports=s.transports)

    async def Pull(self, request: pb.PullRequest, context: grpc.aio.ServicerContext):
        s = self.sidecar
        if request.instance and request.instance != s.instance:
            s.metrics.failures.labels("prefill", PEER_RESTARTED).inc()
            await refuse_restarted(context, (
                f"transfer {request.transfer_id} was held by sidecar instance "
                f"{request.instance}; this is instance {s.instance} at that address (the "
                "sidecar restarted): nothing of it is here"))
        transfer = s.store.get(request.transfer_id)
        if transfer is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no transfer {request.transfer_id} here (lease expired?)")
        if request.model and transfer.model != request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"transfer {request.transfer_id} is of model {transfer.model!r}")
        chosen = negotiate(s.transports, request.transports)
        s.chose("prefill", chosen, context.peer(), "")
        messages = s.stamped(transfer.messages(s.config.transfer_timeout_s), chosen)
        settled = False  # the end went out, or the failure was reported
        try:
            async for message in s.sending(chosen)(s.measured(messages)):
                if message.chunk is not None:
                    s.metrics.wire_bytes.labels("sent").inc(len(message.chunk.payload))
                settled = message.end is not None
                yield message
        except TransferFailed as exc:
            settled = True
            s.metrics.failures.labels("prefill", exc.reason).inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            if not settled:
                # The reader went away mid-transfer (decode gone, or it gave up at its
                # deadline): it recomputes, and what is held here is of no use any more.
                transfer.fail("pull", "the reader went away")
                s.metrics.failures.labels("prefill", "pull").inc()
                log.warning("pull abandoned", extra={"transfer": transfer.transfer_id})

    async def Push(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PushReply:
        s = self.sidecar
        transfer: Transfer | None = None
        try:
            async for message in request_iterator:
                if transfer is None:
                    transfer = await self._pushed(message, context)
                try:
                    message = await s.incoming(message)
                except TransportError as exc:
                    transfer.fail("peer", str(exc))
                    continue
                s.receive(transfer, message, context.peer())
            if transfer is not None and not transfer.done:
                # A call the sender cancelled (its deadline, its channel closed, its
                # process gone) ends the request stream here like a close does, and
                # the cancellation lands on this task just after: wait for it.
                await asyncio.sleep(CANCEL_GRACE_S)
                transfer.fail("peer", "the sender closed the pushed stream before its end")
        except asyncio.CancelledError:
            if transfer is not None:
                transfer.fail("peer", "the pushed stream was cancelled: the sender gave up "
                              "(deadline, connection lost; see its log)")
            raise
        except (grpc.aio.AioRpcError, TransferFailed) as exc:
            if transfer is not None:
                transfer.fail("peer", f"the pushed stream broke: {exc}")
            raise
        return pb.PushReply(chunks=len(transfer.chunks) if transfer else 0)

    async def _pushed(self, message: peerwire.Message, context) -> Transfer:
        """The transfer a pushed stream's first message opens; refuses (and fails the
        transfer waiting here) a stream meant for, or from, another sidecar instance."""
        s = self.sidecar
        header = message.header
        if header is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "a pushed stream starts with its header")
        if header.receiver_instance and header.receiver_instance != s.instance:
            problem = (f"the push of transfer {header.transfer_id} is for sidecar instance "
                       f"{header.receiver_instance}; this is instance {s.instance} (restarted)")
            waiting = s.store.get(header.transfer_id)
            if waiting is not None:
                waiting.fail(PEER_RESTARTED, problem)
            await refuse_restarted(context, problem)
        transfer = s.store.open(header.transfer_id, header.model)
        if not transfer.claim_peer(header.instance):
            problem = (f"transfer {header.transfer_id} is wanted from sidecar instance "
                       f"{transfer.peer_instance}; the pusher is instance {header.instance}")
            transfer.fail(PEER_RESTARTED, problem)
            await refuse_restarted(context, problem)
        return transfer


# ---- command line ----------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any ``extra`` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(parser: argparse.ArgumentParser) -> None:
    d = SidecarConfig(local="")
    parser.add_argument("--local", required=True,
                        help="address for the connector, e.g. unix:///run/kvpool/sidecar.sock")
    parser.add_argument("--peer", default=d.peer, help="host:port for other sidecars (port 0: any)")
    parser.add_argument("--advertise", default=d.advertise,
                        help="peer address other sidecars reach this one at (default: --peer)")
    parser.add_argument("--metrics", default=d.metrics,
                        help="host:port of the Prometheus endpoint ('' for none)")
    parser.add_argument("--level", default=d.level, choices=(*codec.levels(), ADAPTIVE),
                        help="level of chunks whose connector names none "
                             "(adaptive: chosen per chunk from the measured throughput)")
    parser.add_argument("--transport", default=d.transport, choices=TRANSPORTS,
                        help="how chunk payloads should cross to the peer sidecar (nixl: "
                             "with peers that have NIXL too, gRPC with the others)")
    parser.add_argument("--tls-dir", default=d.tls_dir,
                        help="folder with ca.crt, tls.crt, tls.key: mutual TLS between sidecars")
    parser.add_argument("--ttft-target-ms", type=float, default=d.ttft_target_s * 1e3,
                        help="adaptive level: the time by which a transfer's KV must be in decode")
    parser.add_argument("--decode-reserve-ms", type=float, default=d.decode_reserve_s * 1e3,
                        help="adaptive level: the part of the TTFT target decode needs itself")
    parser.add_argument("--nixl-slots", type=int, default=d.nixl_slots,
                        help="NIXL transport: registered chunk buffers (bounds memory)")
    parser.add_argument("--nixl-slot-mb", type=float, default=d.nixl_slot_bytes / 2**20,
                        help="NIXL transport: size of one buffer (the largest encoded chunk)")
    parser.add_argument("--lease", type=float, default=d.lease_s, dest="lease_s",
                        help="seconds a transfer is held at most")
    parser.add_argument("--transfer-timeout", type=float, default=d.transfer_timeout_s,
                        dest="transfer_timeout_s",
                        help="seconds to wait for a transfer to complete")
    parser.add_argument("--codec-threads", type=int, default=d.codec_threads)
    parser.add_argument("--shm-dir", default=d.shm_dir,
                        help="memory-backed directory shared with the connector, for decoded "
                             f"chunks (default ${shm.ENV_DIR} or {shm.DEFAULT_DIR}; 'off': none)")
    parser.add_argument("--shm-max-mb", type=float, default=d.shm_max_bytes / 2**20,
                        help="the most shared memory held at once (under the directory's limit)")
    parser.add_argument("--profile", default=d.profile, metavar="FILE",
                        help="codec profile of the model (kvpool profile) for lossy chunks; "
                             "both sidecars of a pair need the same one")
    parser.add_argument("--ready-file", help="also write the ready line to this file")
    parser.add_argument("--log-level", default="info")


async def serve(config: SidecarConfig, ready_file: str | None = None) -> None:
    sidecar = Sidecar(config)
    endpoints = await sidecar.start()
    line = json.dumps({"event": "ready", "pid": os.getpid(), **endpoints,
                       "transports": list(sidecar.transports)})
    if ready_file:
        tmp = Path(f"{ready_file}.tmp")
        tmp.write_text(line + "\n")
        tmp.replace(ready_file)  # atomic: a reader never sees half a line
    print(line, flush=True)
    log.info("ready", extra=endpoints)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await sidecar.stop()


def run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    config = SidecarConfig(
        local=args.local, peer=args.peer, advertise=args.advertise, metrics=args.metrics,
        level=args.level, lease_s=args.lease_s, transfer_timeout_s=args.transfer_timeout_s,
        codec_threads=args.codec_threads, transport=args.transport, tls_dir=args.tls_dir,
        ttft_target_s=args.ttft_target_ms / 1e3, decode_reserve_s=args.decode_reserve_ms / 1e3,
        nixl_slots=args.nixl_slots, nixl_slot_bytes=int(args.nixl_slot_mb * 2**20),
        shm_dir=args.shm_dir, shm_max_bytes=int(args.shm_max_mb * 2**20),
        profile=args.profile,
    )
    try:
        asyncio.run(serve(config, args.ready_file))
    except codec.ChunkCodecError as exc:  # a profile that cannot be used
        print(f"kvpool sidecar: {exc}", file=sys.stderr)
        return 2
    return 0
