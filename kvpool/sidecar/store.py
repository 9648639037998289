"""The sidecar's transfers in memory: chunks as they are produced, held under a lease.

A :class:`Transfer` is an append-only list of encoded chunks closed by one end message;
any number of readers follow it (:meth:`Transfer.follow`) while it is being written,
which is how a chunk goes on the wire while the next layer is still being computed.
The :class:`TransferStore` drops every transfer whose lease ran out, finished or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvpool.sidecar.peerwire import Chunk, Message
from kvpool.sidecar.proto import sidecar_pb2 as pb

if TYPE_CHECKING:
    from kvpool.sidecar.shm import Segment


class TransferFailed(RuntimeError):
    """The transfer cannot complete (producer gave up, peer stream broke, lease ran out).

    ``reason`` is a short label for metrics: producer, peer, peer_restarted, checksum,
    timeout, expired."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Transfer:
    transfer_id: str
    model: str
    expires_at: float
    """time.monotonic() after which the store drops this transfer."""
    chunks: list[Chunk] = field(default_factory=list)
    end: pb.TransferEnd | None = None
    error: TransferFailed | None = None
    raw_bytes: int = 0
    wire_bytes: int = 0
    created_at: float = field(default_factory=time.monotonic)
    peer_instance: str = ""
    """Receiving side: the instance of the sidecar it comes from (named by the request's
    Load, or by the first stream that brought it); empty while unknown."""
    decoded: dict[int, asyncio.Future] = field(default_factory=dict)
    """Receiving side: chunk index -> its decoding into a Load reply, started as the chunk
    arrived (so that a reader finds it decoded instead of decoding it on the critical path)."""
    segment: Segment | None = None
    """Receiving side: the shared-memory segment its chunks are decoded into, if any."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.end is not None or self.error is not None

    def claim_peer(self, instance: str) -> bool:
        """Whether this transfer may come from sidecar ``instance`` (empty: not said): the
        first instance named sticks, and another one is refused."""
        if not instance:
            return True
        if not self.peer_instance:
            self.peer_instance = instance
        return self.peer_instance == instance

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def add(self, chunk: Chunk) -> None:
        if self.done:
            raise TransferFailed("producer", f"transfer {self.transfer_id} is already closed")
        self.chunks.append(chunk)
        self.raw_bytes += chunk.raw_bytes
        self.wire_bytes += len(chunk.payload)
        self._notify()

    def finish(self, end: pb.TransferEnd) -> None:
        if self.done:
            return
        if end.failed:
            self.fail("producer", "its producer (connector or sending sidecar) gave up on it")
            return
        self.end = end
        self._notify()

    def fail(self, reason: str, message: str) -> None:
        """Close the transfer as failed and let go of its chunks at once: nobody can use
        them any more (a reader gets the error), so memory does not wait for the lease.
        A transfer already closed is left as it is."""
        if self.done:
            return
        self.release_segment()
        self.error = TransferFailed(reason, f"transfer {self.transfer_id}: {message}")
        self.chunks = []
        for future in self.decoded.values():
            future.cancel()
        self.decoded = {}
        self._notify()

    def release_segment(self) -> None:
        """Remove its shared-memory segment, if any (a reader that still maps it took it
        off the transfer first)."""
        if self.segment is not None:
            self.segment.release()
            self.segment = None

    @property
    def held_bytes(self) -> int:
        """Bytes of encoded chunks this transfer keeps in memory now."""
        return sum(len(c.payload) for c in self.chunks)

    async def follow(self, timeout: float) -> AsyncIterator[Chunk | pb.TransferEnd]:
        """Every chunk, from the first, as it arrives, then the end. Raises TransferFailed
        when the transfer fails or nothing completes it within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.chunks):
                yield self.chunks[sent]
                sent += 1
            if self.error is not None:
                raise self.error
            if self.end is not None:
                if len(self.chunks) != self.end.chunks:
                    raise TransferFailed(
                        "producer",
                        f"transfer {self.transfer_id} ended with {len(self.chunks)} of "
                        f"{self.end.chunks} chunks"
                    )
                yield self.end
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferFailed(
                    "timeout", f"transfer {self.transfer_id} incomplete after {timeout:g} s"
                )
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                continue

    async def messages(self, timeout: float, *, end_on_failure: bool = False
                       ) -> AsyncIterator[Message]:
        """The transfer as a peer stream: header, chunks, end. When the transfer fails,
        raises TransferFailed, or with ``end_on_failure`` ends the stream with a failed
        end (so that the receiver learns it, where an exception would only cancel the
        call; the reason stays in ``self.error``)."""
        yield Message(header=pb.TransferHeader(transfer_id=self.transfer_id, model=self.model))
        try:
            async for item in self.follow(timeout):
                if isinstance(item, Chunk):
                    yield Message(chunk=item)
                else:
                    yield Message(end=item)
        except TransferFailed:
            if not end_on_failure:
                raise
            yield Message(end=pb.TransferEnd(chunks=len(self.chunks), failed=True))


class TransferStore:
    """Transfers by id, each dropped when its lease (seconds from creation) runs out."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._transfers: dict[str, Transfer] = {}

    def __len__(self) -> int:
        return len(self._transfers)

    def get(self, transfer_id: str) -> Transfer | None:
        return self._transfers.get(transfer_id)

    def transfers(self) -> list[Transfer]:
        """Every transfer held now."""
        return list(self._transfers.values())

    def open(self, transfer_id: str, model: str) -> Transfer:
        """The transfer with this id, created when new; ValueError when the model differs."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            transfer = Transfer(transfer_id, model, expires_at=time.monotonic() + self.lease_s)
            self._transfers[transfer_id] = transfer
        elif model and transfer.model and transfer.model != model:
            raise ValueError(
                f"transfer {transfer_id} holds KV of model {transfer.model!r}, not {model!r}"
            )
        return transfer

    def drop(self, transfer_id: str) -> None:
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is not None:
            transfer.fail("dropped", "dropped")
            transfer.release_segment()

    def expire(self, now: float | None = None) -> list[Transfer]:
        """Drop every transfer past its lease; returns them."""
        now = time.monotonic() if now is None else now
        gone = [t for t in self._transfers.values() if t.expires_at <= now]
        for transfer in gone:
            del self._transfers[transfer.transfer_id]
            transfer.fail("expired", "lease expired")
            transfer.release_segment()
        return gone

    @property
    def held_bytes(self) -> int:
        """Bytes of encoded chunks held in memory by every transfer here."""
        return sum(t.held_bytes for t in self._transfers.values())
