"""KV chunks between sidecars through NIXL (UCX backend): decode pulls, prefill exposes.

The prefill sidecar (:class:`NixlSource`) copies each encoded chunk into a slot of a
registered buffer pool and hands the decode sidecar a :class:`ChunkLocation` (over the
gRPC peer stream). The decode sidecar (:class:`NixlSink`) reads the chunk straight from
the prefill sidecar's memory into a slot of its own registered pool (a one-sided NIXL
READ), checks the CRC-32, and the READ's completion notification tells the source that
the slot is free again.

- Memory is bounded on both sides: a fixed number of fixed-size slots registered once.
  When every slot is taken, :meth:`NixlSource.publish` waits (back-pressure) and fails
  with :class:`TransportTimeout` at its deadline; it never allocates more.
- A slot published but never read (decode gone) is reclaimed when its lease runs out;
  a late READ of a reclaimed slot is refused by a generation number in the location.
- Agent names carry a per-process nonce: a restarted peer at the same address is a new
  agent, and locations naming the old one fail cleanly (:class:`TransportError`).
- Agent metadata travels over a channel the caller owns (:meth:`NixlSource.metadata`,
  :meth:`NixlSink.add_peer`: the sidecars' gRPC peer stream) or NIXL's own listener
  (``listen_port`` on the source, :meth:`NixlSink.fetch_peer` on the sink).
- Buffers live in DRAM, or in VRAM when ``device="cuda"`` (CUDA present).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from kvpool.sidecar import transport

log = logging.getLogger(__name__)

_RELEASE = b"kvpool-release:"

#: UCX error handling mode. ``peer`` lets UCX notice a dead peer but rules out its
#: shared-memory transports, so two processes on one host fall back to TCP (~10x slower);
#: ``none`` allows shared memory and CMA. Every wait here has its own deadline, so a dead
#: peer is caught either way; ``KVPOOL_NIXL_ERROR_HANDLING`` overrides the default.
ERROR_HANDLING = os.environ.get("KVPOOL_NIXL_ERROR_HANDLING", "none")


def _crc32(data) -> int:
    """CRC-32 of any buffer, without copying it (zlib takes the buffer protocol)."""
    return zlib.crc32(data)


class TransportError(transport.TransportError):
    """A chunk could not be moved (peer unknown or gone, transfer error, bad checksum)."""


class TransportTimeout(TransportError, transport.TransportTimeout):
    """A wait for a free slot or for a transfer ran past its deadline."""


def _nixl():
    """Import NIXL's Python API (kept out of module import: the sidecar loads without it).

    NIXL logs INFO lines to stdout, where our commands print their JSON: only its warnings
    are kept (on NIXL's own handler), unless ``NIXL_LOG_LEVEL`` says otherwise."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise TransportError(
            "NIXL is not installed: pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"
        ) from exc
    return nixl_agent, nixl_agent_config, nixl_thread_sync_t


@dataclass(frozen=True)
class ChunkLocation:
    """Where one published chunk lies in the source's registered memory.

    Small and self-contained: it crosses the process boundary (``to_bytes``) in the peer
    stream's chunk message.
    """

    agent: str
    mem_type: str
    addr: int
    length: int
    dev_id: int
    slot: int
    generation: int
    crc32: int

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkLocation:
        try:
            fields = json.loads(data)
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            raise TransportError(f"malformed chunk location: {exc}") from exc


class SlotPool:
    """``slots`` buffers of ``slot_bytes`` each, in one allocation registered with NIXL.

    Not thread-safe on its own: the owning endpoint holds the lock.
    """

    def __init__(self, agent, slots: int, slot_bytes: int, device: str = "cpu") -> None:
        if slots <= 0 or slot_bytes <= 0:
            raise ValueError(f"need slots > 0 and slot_bytes > 0, got {slots}, {slot_bytes}")
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.device = device
        if device == "cpu":
            self._buffer = np.empty(slots * slot_bytes, dtype=np.uint8)
            self.base = self._buffer.ctypes.data
            self.dev_id = 0
            self.mem_type = "DRAM"
        else:
            import torch

            self._buffer = torch.empty(slots * slot_bytes, dtype=torch.uint8, device=device)
            self.base = self._buffer.data_ptr()
            self.dev_id = self._buffer.get_device()
            self.mem_type = "VRAM"
        self._agent = agent
        self._reg = agent.register_memory(
            [(self.base, slots * slot_bytes, self.dev_id, "")], self.mem_type
        )
        self.free = list(range(slots - 1, -1, -1))
        self.generation = [0] * slots

    def addr(self, slot: int) -> int:
        return self.base + slot * self.slot_bytes

    def write(self, slot: int, data: bytes | memoryview) -> None:
        n = len(data)
        start = slot * self.slot_bytes
        if self.device == "cpu":
            self._buffer[start:start + n] = np.frombuffer(data, dtype=np.uint8)
        else:
            import torch

            src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            self._buffer[start:start + n].copy_(src)

    def view(self, slot: int, length: int):
        """The first ``length`` bytes of a slot: a memoryview (DRAM) or a CUDA tensor (VRAM)."""
        start = slot * self.slot_bytes
        part = self._buffer[start:start + length]
        return memoryview(part) if self.device == "cpu" else part

    def close(self) -> None:
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None


class _Endpoint:
    """A NIXL agent (UCX backend) with one bounded pool of registered slots."""

    role = "endpoint"

    def __init__(self, name: str | None, *, slots: int, slot_bytes: int, device: str,
                 listen_port: int | None, error_handling: str, progress_thread: bool) -> None:
        nixl_agent, nixl_agent_config, sync = _nixl()
        self.name = f"{name or self.role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        config = nixl_agent_config(
            enable_prog_thread=progress_thread,
            enable_listen_thread=listen_port is not None,
            listen_port=listen_port or 0,
            backends=[],
            sync_mode=sync.NIXL_THREAD_SYNC_STRICT,
        )
        self.agent = nixl_agent(self.name, config)
        self._listening = listen_port is not None
        if "UCX" not in self.agent.plugin_list:
            raise TransportError("NIXL's UCX backend plugin is not available")
        try:
            self.agent.create_backend("UCX", {"ucx_error_handling_mode": error_handling})
        except Exception as exc:  # the bindings raise nixlBackendError
            raise TransportError(f"cannot start NIXL's UCX backend: {exc}") from exc
        self.pool = SlotPool(self.agent, slots, slot_bytes, device)
        self._lock = threading.Condition()
        self._closed = False

    def metadata(self) -> bytes:
        """This agent's NIXL metadata (connection info and registered memory), for the peer."""
        return self.agent.get_agent_metadata()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        progress = getattr(self, "_progress", None)
        if progress is not None:
            progress.join(5)
        with self._lock:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NixlSource(_Endpoint):
    """Prefill side: holds published chunks in registered memory until decode has read them."""

    role = "kvpool-src"

    def __init__(self, name: str | None = None, *, slots: int = 8, slot_bytes: int = 32 << 20,
                 device: str = "cpu", lease_s: float = 30.0, listen_port: int | None = None,
                 error_handling: str = ERROR_HANDLING) -> None:
        # NIXL's own progress thread spins without pause (a whole core of a 2-core machine);
        # a thread of ours progresses the agent and takes in releases every millisecond
        # instead (a READ target must progress for UCX's TCP transport).
        super().__init__(name, slots=slots, slot_bytes=slot_bytes, device=device,
                         listen_port=listen_port, error_handling=error_handling,
                         progress_thread=False)
        self.lease_s = lease_s
        self._expires: dict[int, float] = {}
        self.reclaimed = 0
        self._progress = threading.Thread(target=self._progress_forever, daemon=True,
                                          name=f"{self.name}-progress")
        self._progress.start()

    def _progress_forever(self, period_s: float = 0.001) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._collect_releases()
            time.sleep(period_s)

    def _collect_releases(self) -> None:
        """Free the slots whose READ completed (NIXL notifications) or whose lease ran out."""
        for messages in self.agent.get_new_notifs().values():
            for msg in messages:
                if not msg.startswith(_RELEASE):
                    continue
                slot, generation = (int(x) for x in msg[len(_RELEASE):].split(b":"))
                if self.pool.generation[slot] == generation and slot in self._expires:
                    self._free(slot)
        now = time.monotonic()
        for slot, expires in list(self._expires.items()):
            if expires <= now:
                log.warning("%s: slot %d not read within its %.1f s lease; reclaimed",
                            self.name, slot, self.lease_s)
                self.reclaimed += 1
                self._free(slot)

    def _free(self, slot: int) -> None:
        del self._expires[slot]
        self.pool.generation[slot] += 1
        self.pool.free.append(slot)
        self._lock.notify_all()

    def publish(self, data: bytes | memoryview, timeout: float = 10.0) -> ChunkLocation:
        """Copy ``data`` into a free slot and return where decode can read it.

        Waits while every slot is held (back-pressure); raises TransportTimeout after
        ``timeout`` seconds and ValueError when ``data`` exceeds a slot.
        """
        if len(data) > self.pool.slot_bytes:
            raise ValueError(f"chunk of {len(data)} bytes exceeds the slot size "
                             f"{self.pool.slot_bytes}; raise slot_bytes or send smaller chunks")
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise TransportError(f"{self.name} is closed")
                self._collect_releases()
                if self.pool.free:
                    slot = self.pool.free.pop()
                    self._expires[slot] = time.monotonic() + self.lease_s
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(
                        f"{self.name}: all {self.pool.slots} slots held for {timeout:.1f} s")
                self._lock.wait(min(left, 0.001))
            self.pool.write(slot, data)
            return ChunkLocation(self.name, self.pool.mem_type, self.pool.addr(slot), len(data),
                                 self.pool.dev_id, slot, self.pool.generation[slot],
                                 _crc32(data))

    def held(self) -> int:
        """Slots published and not yet released (after taking in pending releases)."""
        with self._lock:
            self._collect_releases()
            return len(self._expires)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every published slot is released; True when it happened in time."""
        deadline = time.monotonic() + timeout
        while self.held():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True


class NixlSink(_Endpoint):
    """Decode side: pulls chunks from sources' registered memory into its own slots."""

    role = "kvpool-dst"

    def __init__(self, name: str | None = None, *, slots: int = 4, slot_bytes: int = 32 << 20,
                 device: str = "cpu", listen_port: int | None = None,
                 error_handling: str = ERROR_HANDLING) -> None:
        # The initiator drives its own READs by polling them: a progress thread would only
        # compete with it for the CPU (on 2 cores it costs 3x the bandwidth).
        super().__init__(name, slots=slots, slot_bytes=slot_bytes, device=device,
                         listen_port=listen_port, error_handling=error_handling,
                         progress_thread=False)
        self._peers: set[str] = set()

    def add_peer(self, metadata: bytes) -> str:
        """Load a source's metadata (received over the peer channel); returns its agent name."""
        name = self.agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self._peers.add(name)
        return name

    def fetch_peer(self, agent: str, host: str, port: int, timeout: float = 10.0) -> str:
        """Ask a source's NIXL listener at ``host:port`` for its metadata (NIXL's comm
        thread does the asking: the sink needs a ``listen_port`` of its own)."""
        if not self._listening:
            raise TransportError("fetch_peer needs a sink created with listen_port")
        self.agent.fetch_remote_metadata(agent, host, port)
        deadline = time.monotonic() + timeout
        while not self.agent.check_remote_metadata(agent):
            if time.monotonic() >= deadline:
                raise TransportTimeout(f"no metadata from {agent} at {host}:{port} in {timeout} s")
            time.sleep(0.005)
        self._peers.add(agent)
        return agent

    def remove_peer(self, agent: str) -> None:
        if agent in self._peers:
            self._peers.discard(agent)
            self.agent.remove_remote_agent(agent)

    def pull(self, loc: ChunkLocation, timeout: float = 10.0) -> bytes:
        """Read the chunk at ``loc``, verify its CRC-32 and return a copy of its bytes.

        Raises TransportError (unknown peer, transfer error, checksum mismatch) or
        TransportTimeout; the source's slot is then reclaimed by its lease.
        """
        with self.pulled(loc, timeout) as view:
            return bytes(view)

    @contextlib.contextmanager
    def pulled(self, loc: ChunkLocation, timeout: float = 10.0, *, verify: bool = True):
        """Like :meth:`pull`, but lends the landing slot itself (no copy) until the block ends.

        Yields a memoryview (DRAM) or a uint8 CUDA tensor (VRAM; ``verify`` needs DRAM).
        """
        if loc.agent not in self._peers:
            raise TransportError(f"unknown peer agent {loc.agent!r} (restarted or never added)")
        if loc.length > self.pool.slot_bytes:
            raise TransportError(f"chunk of {loc.length} bytes exceeds the local slot size")
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self.pool.free:
                if self._closed:
                    raise TransportError(f"{self.name} is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(f"{self.name}: no free landing slot in {timeout:.1f} s")
                self._lock.wait(left)
            slot = self.pool.free.pop()
        try:
            self._read(loc, slot, deadline)
            view = self.pool.view(slot, loc.length)
            if verify:
                host = view if self.pool.mem_type == "DRAM" else view.cpu().numpy()
                if _crc32(host) != loc.crc32:
                    raise TransportError(f"chunk from {loc.agent} slot {loc.slot}: CRC-32 mismatch")
            yield view
        finally:
            with self._lock:
                self.pool.free.append(slot)
                self._lock.notify_all()

    def _read(self, loc: ChunkLocation, slot: int, deadline: float) -> None:
        local = self.agent.get_xfer_descs(
            [(self.pool.addr(slot), loc.length, self.pool.dev_id)], self.pool.mem_type)
        remote = self.agent.get_xfer_descs([(loc.addr, loc.length, loc.dev_id)], loc.mem_type)
        notif = _RELEASE + f"{loc.slot}:{loc.generation}".encode()
        try:
            handle = self.agent.initialize_xfer("READ", local, remote, loc.agent, notif)
        except Exception as exc:  # NIXL raises its own error types from the bindings
            raise TransportError(f"cannot read from {loc.agent}: {exc}") from exc
        try:
            state = self._state(self.agent.transfer, handle, loc)
            while state == "PROC":
                if time.monotonic() >= deadline:
                    raise TransportTimeout(f"READ of {loc.length} bytes from {loc.agent} timed out")
                time.sleep(0)  # polling is what progresses the READ (no progress thread)
                state = self._state(self.agent.check_xfer_state, handle, loc)
            if state != "DONE":
                raise TransportError(f"READ from {loc.agent} failed ({state})")
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001 - an in-flight READ NIXL cannot cancel stays with it
                log.warning("%s: could not release a transfer handle", self.name)

    @staticmethod
    def _state(call, handle, loc: ChunkLocation) -> str:
        try:
            return call(handle)
        except Exception as exc:  # nixlRemoteDisconnectError and the like
            raise TransportError(f"READ from {loc.agent} failed: {exc}") from exc


class NixlPeerTransport(transport.PeerTransport):
    """The payloads of a sidecar's transfers through NIXL; the Peer gRPC stream of
    ``carrier`` (the sidecar's :class:`~kvpool.sidecar.transport.GrpcTransport`) carries
    the control messages and each chunk's location.

    The sending sidecar publishes each payload into its :class:`NixlSource` and puts the
    location on the stream instead; the header carries its agent metadata once per stream.
    The receiving sidecar loads that metadata (once per agent), pulls the payload into its
    :class:`NixlSink` and hands the message on with the payload filled in, so the rest of
    the sidecar (CRC check, decode) does not know which transport ran. A stream whose
    chunks carry payloads passes ``incoming`` unchanged: which transport a transfer takes
    is negotiated by the two sidecars (:func:`kvpool.sidecar.transport.negotiate`).
    """

    def __init__(self, carrier: transport.GrpcTransport | None = None, *, slots: int = 64,
                 slot_bytes: int = 16 << 20, device: str = "cpu", lease_s: float = 120.0,
                 timeout_s: float = 30.0) -> None:
        self._owns_carrier = carrier is None
        self.carrier = carrier or transport.GrpcTransport()
        self.source = NixlSource("kvpool-prefill", slots=slots, slot_bytes=slot_bytes,
                                 device=device, lease_s=lease_s)
        try:
            self.sink = NixlSink("kvpool-decode", slots=4, slot_bytes=slot_bytes, device=device)
        except BaseException:
            self.source.close()
            raise
        self.timeout_s = timeout_s
        self._metadata = self.source.metadata()
        self._agents: dict[bytes, str] = {}

    async def _run(self, fn, *args):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def outgoing(self, messages):
        import dataclasses

        from kvpool.sidecar.peerwire import Message
        from kvpool.sidecar.proto import sidecar_pb2 as pb

        async for message in messages:
            kind = message.kind
            if kind == "header":
                header = pb.TransferHeader()
                header.CopyFrom(message.header)
                header.nixl_metadata = self._metadata
                message = Message(header=header)
            elif kind == "chunk" and message.chunk.payload:
                loc = await self._run(self.source.publish, message.chunk.payload, self.timeout_s)
                message = Message(chunk=dataclasses.replace(
                    message.chunk, payload=b"", nixl_location=loc.to_bytes()))
            yield message

    async def incoming(self, message):
        import hashlib

        kind = message.kind
        if kind == "header" and message.header.nixl_metadata:
            digest = hashlib.sha256(message.header.nixl_metadata).digest()
            if digest not in self._agents:
                try:
                    self._agents[digest] = self.sink.add_peer(message.header.nixl_metadata)
                except Exception as exc:  # the bindings raise their own error types
                    raise TransportError(f"cannot load the peer's NIXL metadata: {exc}") from exc
        elif kind == "chunk" and message.chunk.nixl_location:
            loc = ChunkLocation.from_bytes(message.chunk.nixl_location)
            message.chunk.payload = await self._run(self.sink.pull, loc, self.timeout_s)
            message.chunk.nixl_location = b""
        return message

    async def pull(self, peer, request, *, timeout):
        async for message in self.carrier.pull(peer, request, timeout=timeout):
            yield await self.incoming(message)

    async def push(self, peer, messages, *, timeout):
        return await self.carrier.push(peer, self.outgoing(messages), timeout=timeout)

    async def close(self) -> None:
        if self._owns_carrier:
            await self.carrier.close()
        self.source.close()
        self.sink.close()
