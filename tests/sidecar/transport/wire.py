"""A TCP proxy on loopback that breaks a gRPC link between two sidecars on purpose.

It forwards both directions byte for byte, and reads the server's HTTP/2 frames (h2c,
no TLS) as they pass, following each stream's gRPC messages (5-byte prefix, then the
message) through its DATA frames. ``mode`` says what it does to the server's answers:

- ``pass``: nothing (a plain proxy);
- ``corrupt``: flips one byte in the middle of the first large message (a chunk's
  payload), once, leaving the framing intact: only the chunk's checksum can tell;
- ``stall``: from the first DATA frame on, swallows every frame: the call is accepted,
  its headers come, then nothing (no message, no trailers);
- ``silent``: no upstream at all: accepts connections and never sends a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

DATA = 0x0
LARGE = 4096
"""Messages at least this long are chunks (a header or an end message is tens of bytes)."""


@dataclass
class _Messages:
    """Where one stream is in its sequence of gRPC messages."""

    prefix: bytearray = field(default_factory=bytearray)
    size: int | None = None
    pos: int = 0


class Proxy:
    def __init__(self, upstream: str, mode: str = "pass") -> None:
        if mode not in ("pass", "corrupt", "stall", "silent"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        self.upstream = upstream
        self.mode = mode
        self.corrupted = 0
        self.swallowed = 0
        self.address = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()

    async def _connect(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        self._writers.append(client_w)
        if self.mode == "silent":
            coros = [self._drain(client_r)]
        else:
            host, _, port = self.upstream.rpartition(":")
            try:
                server_r, server_w = await asyncio.open_connection(host, int(port))
            except OSError:
                client_w.close()
                return
            self._writers.append(server_w)
            coros = [self._copy(client_r, server_w), self._frames(server_r, client_w)]
        for coro in coros:
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(1 << 16):
                pass

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        streams: dict[int, _Messages] = {}
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                body = bytearray(await reader.readexactly(length))
                if self.mode == "stall" and (self.swallowed or head[3] == DATA):
                    self.swallowed += 1
                    continue
                if head[3] == DATA:
                    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                    self._scan(streams.setdefault(stream, _Messages()), body)
                writer.write(head + body)
                await writer.drain()
        writer.close()

    def _scan(self, st: _Messages, data: bytearray) -> None:
        """Follow the gRPC messages through one DATA frame (corrupting one if asked)."""
        i = 0
        while i < len(data):
            if st.size is None:
                take = min(5 - len(st.prefix), len(data) - i)
                st.prefix += data[i:i + take]
                i += take
                if len(st.prefix) == 5:
                    st.size, st.pos = int.from_bytes(st.prefix[1:], "big"), 0
                    st.prefix = bytearray()
                    if st.size == 0:
                        st.size = None
                continue
            take = min(st.size - st.pos, len(data) - i)
            middle = st.size // 2
            if (self.mode == "corrupt" and not self.corrupted and st.size >= LARGE
                    and st.pos <= middle < st.pos + take):
                data[i + middle - st.pos] ^= 0xFF
                self.corrupted += 1
            st.pos += take
            i += take
            if st.pos == st.size:
                st.size = None

