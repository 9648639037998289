"""The connector's blocking client of its local sidecar (the ``Local`` gRPC service)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from kvpool.sidecar.proto import sidecar_pb2 as pb
from kvpool.sidecar.proto import sidecar_pb2_grpc as pb_grpc
from kvpool.sidecar.transport import CHANNEL_OPTIONS


class SidecarClient:
    """One channel to the sidecar at ``address`` (``unix:///path`` or host:port)."""

    def __init__(self, address: str, *, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.LocalStub(self._channel)

    def watch(self, callback) -> None:
        """Call ``callback(state)`` on every change of the channel's connectivity (from a
        gRPC thread): a sidecar that restarted was reached over a new connection."""
        self._channel.subscribe(callback, try_to_connect=False)

    def info(self) -> pb.InfoReply:
        return self._stub.Info(pb.InfoRequest(), timeout=self.timeout_s)

    def put(self, request: pb.PutRequest) -> pb.PutReply:
        return self._stub.Put(request, timeout=self.timeout_s)

    def seal(self, request: pb.SealRequest) -> pb.SealReply:
        return self._stub.Seal(request, timeout=self.timeout_s)

    def load(self, request: pb.LoadRequest) -> Iterator[pb.LoadReply]:
        """The transfer's chunks then its end; grpc.RpcError when it cannot complete."""
        return self._stub.Load(request, timeout=self.timeout_s)

    def release(self, transfer_id: str) -> pb.ReleaseReply:
        """Let the sidecar remove the transfer's shared memory (read, or given up)."""
        return self._stub.Release(pb.ReleaseRequest(transfer_id=transfer_id),
                                  timeout=self.timeout_s)

    def close(self) -> None:
        self._channel.close()
