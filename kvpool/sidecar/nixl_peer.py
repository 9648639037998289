"""A NIXL source in a process of its own, driven over a pipe: the prefill side of a transfer.

Benchmarks and tests need the two ends of a NIXL transfer in two processes (NIXL between
two agents of one process would not show what the wire does). :class:`SourceProcess`
starts one and forwards calls to its :class:`~kvpool.sidecar.transport_nixl.NixlSource`;
the pipe carries the agent metadata, the chunks to publish and their locations. The
process can join a network namespace and set UCX's environment before its agent starts
(``netns``, ``env``): the source on one side of an emulated link.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import Connection
from typing import Self

from kvpool.sidecar.transport_nixl import ChunkLocation, TransportError


def _serve(conn: Connection, options: dict, namespace: str | None, env: dict[str, str]) -> None:
    os.environ.update(env)
    try:
        if namespace:
            from kvpool.sidecar import netns

            netns.enter(namespace)
        from kvpool.sidecar.transport_nixl import NixlSource

        source = NixlSource(**options)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    stored = b""
    with source:
        conn.send(("ok", (source.name, source.metadata())))
        while True:
            try:
                op, arg = conn.recv()
            except EOFError:
                return
            try:
                if op == "publish":
                    reply = source.publish(arg).to_bytes()
                elif op == "store":
                    stored, reply = arg, len(arg)
                elif op == "publish_stored":
                    reply = source.publish(stored, timeout=arg).to_bytes()
                elif op == "stream_kv":
                    _stream_kv(conn, source, *arg)
                    reply = None
                elif op == "held":
                    reply = source.held()
                elif op == "wait_idle":
                    reply = source.wait_idle(arg)
                elif op == "close":
                    conn.send(("ok", None))
                    return
                else:
                    raise ValueError(f"unknown operation {op!r}")
                conn.send(("ok", reply))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _stream_kv(conn: Connection, source, tokens: int, level: str) -> None:
    """Encode a real prompt's KV layer by layer and publish each chunk as soon as it is
    encoded, sending its location at once (the reader pulls while the next one encodes)."""
    from kvpool.sidecar import codec, linkstream, realkv

    raw_chunks = linkstream.layer_chunks(*realkv.prompt_kv(tokens))
    for raw in raw_chunks:
        payload = codec.encode(raw, level, len(raw_chunks))
        conn.send(("chunk", (source.publish(payload).to_bytes(), len(raw.keys) + len(raw.values))))


class SourceProcess:
    """A :class:`NixlSource` in a child process (``options`` are its keyword arguments),
    in network namespace ``netns`` when given, with ``env`` added to its environment
    (e.g. ``UCX_TLS``) before NIXL loads."""

    def __init__(self, *, netns: str | None = None, env: dict[str, str] | None = None,
                 **options) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, options, netns, env or {}),
                                 daemon=True)
        self._proc.start()
        child.close()
        self.name, self.metadata = self._reply(timeout=120)

    def _reply(self, timeout: float = 60):
        if not self._conn.poll(timeout):
            raise TransportError(f"NIXL source process gave no answer in {timeout} s")
        status, value = self._conn.recv()
        if status != "ok":
            raise TransportError(f"NIXL source process: {value}")
        return value

    def _call(self, op: str, arg=None, timeout: float = 60):
        self._conn.send((op, arg))
        return self._reply(timeout)

    def publish(self, data: bytes) -> ChunkLocation:
        return ChunkLocation.from_bytes(self._call("publish", data))

    def store(self, data: bytes) -> None:
        self._call("store", data)

    def publish_stored(self, timeout: float = 10.0) -> ChunkLocation:
        return ChunkLocation.from_bytes(self._call("publish_stored", timeout, timeout + 60))

    def stream_kv(self, tokens: int, level: str):
        """Have the source encode and publish a real ``tokens``-token KV at ``level``;
        yields ``(location, raw_bytes)`` per layer as each is published."""
        self._conn.send(("stream_kv", (tokens, level)))
        while True:
            if not self._conn.poll(120):
                raise TransportError("NIXL source process stopped streaming")
            status, value = self._conn.recv()
            if status == "chunk":
                yield ChunkLocation.from_bytes(value[0]), value[1]
            elif status == "ok":
                return
            else:
                raise TransportError(f"NIXL source process: {value}")

    def held(self) -> int:
        return self._call("held")

    def wait_idle(self, timeout: float) -> bool:
        return self._call("wait_idle", timeout, timeout + 60)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def kill(self) -> None:
        """End the process at once (a crashed prefill sidecar)."""
        self._proc.kill()
        self._proc.join(10)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("close", timeout=10)
            except (TransportError, OSError, EOFError):
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(10)
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
