"""How encoded chunks travel between sidecars.

:class:`PeerTransport` is the interface the sidecar uses; a transfer crosses it as a
stream of :class:`~kvpool.sidecar.peerwire.Message` (a header, chunks, an end).
:class:`GrpcTransport` implements it with the ``Peer`` gRPC service (its messages
(de)serialized by :mod:`kvpool.sidecar.peerwire`): HTTP/2 flow control paces the stream,
each call carries a deadline, and each chunk a CRC-32C of its payload (checked by the
receiving sidecar), over plaintext or mutual TLS (:mod:`kvpool.sidecar.tls`). Other
transports (NIXL: :mod:`kvpool.sidecar.transport_nixl`) keep the stream for control and
move payloads their own way, through the ``outgoing`` and ``incoming`` hooks.

Which transport a pair of sidecars uses is negotiated per transfer (:func:`negotiate`):
each sidecar advertises what it can use (``Info``, ``Hello``, the pull request and the
stream's header), and NIXL is chosen only when both ends have it; anything else is gRPC.
Each sidecar process is an *instance* (:func:`new_instance`, random at start): a pull,
push or load that names another instance of a sidecar is refused with
``FAILED_PRECONDITION`` and the trailing metadata ``kvpool-reason: peer_restarted``, which
the requesting side raises as :class:`PeerRestarted`.
"""

from __future__ import annotations

import abc
import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable

import grpc

from kvpool.sidecar.peerwire import Message, PeerStub
from kvpool.sidecar.proto import sidecar_pb2 as pb

MAX_MESSAGE_BYTES = 256 << 20
"""Largest gRPC message accepted or sent (a chunk: one layer of a prefill step)."""

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Large chunks: let HTTP/2 windows grow to the bandwidth-delay product quickly.
    ("grpc.http2.bdp_probe", 1),
    ("grpc.http2.lookahead_bytes", 4 << 20),
)


GRPC = "grpc"
NIXL = "nixl"
TRANSPORTS = (GRPC, NIXL)

PEER_RESTARTED = "peer_restarted"
"""Failure reason (metrics, health) of a transfer held by, or meant for, another instance
of a sidecar: the process at that address restarted since the transfer was named."""
REASON_KEY = "kvpool-reason"
"""Trailing metadata key of a refusal's reason."""


def new_instance() -> str:
    """A sidecar process's instance id: random, so a restart at the same address is new."""
    return uuid.uuid4().hex[:12]


def negotiate(ours: Iterable[str], theirs: Iterable[str]) -> str:
    """The payload transport of a pair: NIXL when both ends can use it, else gRPC (every
    sidecar speaks gRPC; an empty list is an older sidecar: gRPC only)."""
    return NIXL if NIXL in set(ours) and NIXL in set(theirs) else GRPC


def _current_task_cancelling() -> bool:
    """Whether this task itself is being cancelled (not just a call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class TransportError(RuntimeError):
    """The peer could not be reached or the stream broke."""


class TransportTimeout(TransportError, TimeoutError):
    """The peer did not answer or finish within the call's deadline (a starved link)."""


class PeerRestarted(TransportError):
    """The peer refused the call: it is (or the transfer is of) another instance of a
    sidecar than the one named; the state named is gone."""


def refusal_metadata() -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a call refused because it names another instance."""
    return ((REASON_KEY, PEER_RESTARTED),)


def _reason(exc: grpc.aio.AioRpcError) -> str:
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never started has none
        return ""
    return next((str(v) for k, v in metadata if k == REASON_KEY), "")


def _error(what: str, exc: grpc.aio.AioRpcError) -> TransportError:
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = TransportTimeout
    elif exc.code() == grpc.StatusCode.FAILED_PRECONDITION and _reason(exc) == PEER_RESTARTED:
        kind = PeerRestarted
    else:
        kind = TransportError
    return kind(f"{what}: {exc.code().name}: {exc.details()}")


class PeerTransport(abc.ABC):
    """Moves a transfer's messages to or from another sidecar."""

    @abc.abstractmethod
    def pull(
        self, peer: str, request: pb.PullRequest, *, timeout: float
    ) -> AsyncIterator[Message]:
        """The transfer ``request`` names, held by ``peer``, as it is produced: header,
        chunks, end."""

    @abc.abstractmethod
    async def push(
        self, peer: str, messages: AsyncIterator[Message], *, timeout: float
    ) -> int:
        """Stream a transfer to ``peer``; returns how many chunks it took."""

    async def outgoing(
        self, messages: AsyncIterator[Message]
    ) -> AsyncIterator[Message]:
        """A transfer's messages as this transport puts them on the peer stream (the
        sending side of ``Pull`` calls this; ``push`` does it itself)."""
        async for message in messages:
            yield message

    async def incoming(self, message: Message) -> Message:
        """The inverse of ``outgoing`` for one message (the receiving side of ``Push``
        calls this; ``pull`` does it itself). Raises TransportError."""
        return message

    async def close(self) -> None:
        """Release connections."""


class GrpcTransport(PeerTransport):
    """The ``Peer`` gRPC service over TCP, one channel per peer address.

    With ``credentials`` (:func:`kvpool.sidecar.tls.channel_credentials`) every channel is
    mutual TLS and checks the peer's certificate for :data:`kvpool.sidecar.tls.PEER_NAME`.
    """

    def __init__(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._credentials = credentials

    def _stub(self, peer: str) -> PeerStub:
        channel = self._channels.get(peer)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(peer, options=CHANNEL_OPTIONS)
            else:
                from kvpool.sidecar import tls

                channel = grpc.aio.secure_channel(
                    peer, self._credentials, options=CHANNEL_OPTIONS + tuple(tls.channel_options())
                )
            self._channels[peer] = channel
        return PeerStub(channel)

    async def hello(self, peer: str, *, timeout: float) -> pb.HelloReply:
        """``peer``'s instance and transports."""
        try:
            return await self._stub(peer).Hello(pb.HelloRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(f"hello to {peer}", exc) from exc

    async def pull(
        self, peer: str, request: pb.PullRequest, *, timeout: float
    ) -> AsyncIterator[Message]:
        call = self._stub(peer).Pull(request, timeout=timeout)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise _error(f"pull from {peer}", exc) from exc
        finally:
            call.cancel()

    async def push(
        self, peer: str, messages: AsyncIterator[Message], *, timeout: float
    ) -> int:
        failed: list[BaseException] = []

        async def watched() -> AsyncIterator[Message]:
            try:
                async for message in messages:
                    yield message
            except Exception as exc:
                failed.append(exc)
                raise

        try:
            reply = await self._stub(peer).Push(watched(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(f"push to {peer}", exc) from exc
        except asyncio.CancelledError:
            # gRPC cancels the call when the messages raise: that error is the news
            if failed and not _current_task_cancelling():
                raise failed[0] from None
            raise
        return reply.chunks

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
