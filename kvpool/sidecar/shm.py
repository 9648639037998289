"""Shared memory between a connector and its own sidecar: decoded chunks handed over in place.

The decode sidecar decodes each arriving chunk straight into a file of a memory-backed
directory (``/dev/shm`` on one host; in a pod, an ``emptyDir`` with ``medium: Memory``
mounted into the vLLM and sidecar containers), one file (a *segment*) per transfer, and
``Load`` replies carry :class:`SharedChunk` descriptors (segment, offset, length) instead
of the bytes. The connector maps the region and scatters from the mapping: no copy
through the socket, no protobuf parse. Files and :mod:`mmap` (the standard library) are
used rather than :mod:`multiprocessing.shared_memory`, whose segments live in
``/dev/shm`` only (not in an ``emptyDir`` at another path) and whose resource tracker
unlinks what another process attached to.

Lifetime: a segment is removed when its connector calls ``Release`` (loaded or failed),
when its transfer fails, or when its lease ends, whichever comes first; a mapping the
connector holds stays valid after the removal (the kernel frees the pages with the last
mapping). Every name carries the sidecar instance (a fresh id per start), so a restarted
sidecar never serves a file of its predecessor, and each instance holds a lock file
(``flock``) for its lifetime: at start a sidecar removes the files of every instance whose
lock is no longer held (its process is gone), and nothing of a live one.

The prefill connector hands its chunks over the same way in the other direction: it
writes each chunk's keys and values into its *put buffer* (a file of its own there, held
under ``flock`` while the process lives) and ``Put`` names the region; the sidecar reads
them before replying, so one buffer serves the connector's one Put in flight. The sidecar
removes the buffers of connectors that are gone (their lock is free).

Negotiation: the sidecar writes a probe file holding a random token and announces the
directory, the probe's name and the token in ``Info``; the connector reads the probe
through its own path to the directory (``shm_dir``; default: the sidecar's) and asks for
descriptors only when it finds the token. Otherwise chunks travel as bytes, as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from kvpool.sidecar import chunks
from kvpool.sidecar.proto import sidecar_pb2 as pb

log = logging.getLogger("kvpool.sidecar.shm")
T = TypeVar("T")

DEFAULT_DIR = "/dev/shm"
ENV_DIR = "KVPOOL_SHM_DIR"
"""Environment variable naming the directory (sidecar ``--shm-dir``, connector ``shm_dir``)."""
OFF = ("", "off", "none")
"""Values of the directory setting that turn shared memory off."""
PREFIX = "kvpool-"
PAGE = mmap.ALLOCATIONGRANULARITY
FILE_MODE = 0o640
PUT_PREFIX = "kvpool-put-"
PUT_MODE = 0o644
"""A put buffer is written by the connector and read by the sidecar, maybe another user."""
PUT_GRACE_S = 5.0
"""A put buffer younger than this is never swept (its connector may not hold it yet)."""
_NAME = re.compile(r"kvpool-[0-9a-f]+-[0-9]+")
_PUT_NAME = re.compile(r"kvpool-put-[0-9a-f]+")
_INSTANCE = re.compile(r"kvpool-([0-9a-f]+)\.lock")


class ShmFull(Exception):
    """No room for a chunk (the configured bound or the filesystem's size limit): the
    chunk goes as bytes instead."""


class ShmError(ValueError):
    """A descriptor that cannot be mapped: unknown segment, out of range, wrong sizes."""


def default_dir() -> str:
    return os.environ.get(ENV_DIR, DEFAULT_DIR)


def enabled(directory: str) -> bool:
    return directory.strip().lower() not in OFF


@contextlib.contextmanager
def _if_unlocked(path: Path) -> Iterator[bool]:
    """Whether no live process holds ``path``'s lock: taken here for the body, so that its
    owner cannot come back meanwhile (False when the file is gone or another user's)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _aligned(n: int) -> int:
    return -(-n // PAGE) * PAGE


# ---- sidecar side ------------------------------------------------------------------------


class Segment:
    """One transfer's file: chunk regions appended at page-aligned offsets.

    Offsets are reserved on the event loop (:meth:`reserve`); the regions are written in
    codec threads (:meth:`write`). The file descriptor stays open while a write is in
    flight, also past :meth:`release` (which unlinks the file at once)."""

    def __init__(self, owner: SegmentDir, transfer_id: str, name: str, expires_at: float) -> None:
        self.owner = owner
        self.transfer_id = transfer_id
        self.name = name
        self.path = owner.directory / name
        self.expires_at = expires_at
        self.size = 0
        """Bytes reserved (the end of the last region)."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._lock = threading.Lock()
        self._writers = 0
        self.released = False

    def reserve(self, nbytes: int) -> int:
        """The offset of a new region of ``nbytes``; ShmFull past the directory's bound."""
        length = _aligned(nbytes)
        if self.released:
            raise ShmFull(f"segment {self.name} was released")
        if self.owner.held_bytes + length > self.owner.max_bytes:
            raise ShmFull(f"shared memory holds {self.owner.held_bytes} of "
                          f"{self.owner.max_bytes} bytes")
        offset = self.size
        self.size += length
        self.owner.held_bytes += length
        return offset

    @contextlib.contextmanager
    def _open_fd(self):
        with self._lock:
            if self.released:
                raise ShmFull(f"segment {self.name} was released")
            self._writers += 1
        try:
            yield self.fd
        finally:
            with self._lock:
                self._writers -= 1
                if self.released and not self._writers:
                    os.close(self.fd)

    def write(self, offset: int, nbytes: int, fill: Callable[[np.ndarray], T]) -> T:
        """Let ``fill`` write a region through a mapping (a uint8 array of ``nbytes``).
        ShmFull when the filesystem has no room (a memory-backed emptyDir at its limit)."""
        with self._open_fd() as fd:
            try:
                os.posix_fallocate(fd, offset, nbytes)  # room now, not SIGBUS at first touch
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG):
                    raise ShmFull(f"{self.owner.directory} is full: {exc}") from exc
                raise
            # The mapping goes when the last array over it does (no close: an explicit
            # one would leave views over unmapped memory).
            return fill(np.frombuffer(mmap.mmap(fd, nbytes, offset=offset), dtype=np.uint8))

    def read(self, offset: int, nbytes: int) -> bytes:
        """A region's bytes (for a reader that does not map the segment)."""
        with self._open_fd() as fd:
            return os.pread(fd, nbytes, offset)

    def release(self) -> int:
        """Remove the file (idempotent); returns the bytes given back."""
        with self._lock:
            if self.released:
                return 0
            self.released = True
            if not self._writers:
                os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return self.owner._forget(self)


class SegmentDir:
    """The sidecar's segments in one directory, under a bound of ``max_bytes``."""

    def __init__(self, directory: str | Path, max_bytes: int, lease_s: float) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.lease_s = lease_s
        self.instance = secrets.token_hex(6)
        self.token = secrets.token_hex(16)
        self.held_bytes = 0
        self._segments: dict[str, Segment] = {}
        self._count = 0
        if not self.directory.is_dir():
            raise OSError(f"shared-memory directory {self.directory} does not exist")
        self._lock_path = self.directory / f"{PREFIX}{self.instance}.lock"
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.removed_stale = self._sweep()
        self.probe = f"{PREFIX}{self.instance}.probe"
        probe = self.directory / self.probe
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

    def _sweep(self) -> int:
        """Remove the files of instances whose process is gone (their lock is free)."""
        removed = self.sweep_put_buffers()
        for lock in self.directory.glob(f"{PREFIX}*.lock"):
            match = _INSTANCE.fullmatch(lock.name)
            if match is None or match.group(1) == self.instance:
                continue
            with _if_unlocked(lock) as gone:
                if not gone:
                    continue  # alive
                for stale in self.directory.glob(f"{PREFIX}{match.group(1)}[-.]*"):
                    with contextlib.suppress(OSError):
                        stale.unlink()
                        removed += 1
        if removed:
            log.info("removed stale shared-memory files", extra={"files": removed})
        return removed

    def sweep_put_buffers(self) -> int:
        """Remove the put buffers of connectors that are gone (their lock is free)."""
        removed = 0
        for path in self.directory.glob(f"{PUT_PREFIX}*"):
            try:
                if time.time() - path.stat().st_ctime < PUT_GRACE_S:
                    continue  # maybe just made, not locked yet
            except OSError:  # gone
                continue
            with _if_unlocked(path) as gone:
                if gone:  # its connector no longer holds it
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed += 1
        return removed

    def read_put(self, shared: pb.SharedChunk) -> pb.RawChunk:
        """The chunk a connector's Put names in its put buffer, as a RawChunk (one copy
        out of the buffer). ShmError when the descriptor does not fit the buffer."""
        if not _PUT_NAME.fullmatch(shared.segment):
            raise ShmError(f"{shared.segment!r} is not a put buffer name")
        tokens = shared.key.token_end - shared.key.token_start
        if not shared.width or shared.length != chunk_bytes(shared.dtype, shared.width, tokens):
            raise ShmError(f"descriptor of {shared.length} bytes does not hold {tokens} "
                           f"tokens of {shared.width} {shared.dtype} keys and values")
        try:
            fd = os.open(self.directory / shared.segment, os.O_RDONLY)
        except OSError as exc:
            raise ShmError(f"cannot open put buffer {shared.segment} in {self.directory}: "
                           f"{exc.strerror}") from exc
        try:
            data = os.pread(fd, shared.length, shared.offset)
        finally:
            os.close(fd)
        if len(data) != shared.length:
            raise ShmError(f"put buffer {shared.segment} holds {len(data)} of the "
                           f"{shared.length} bytes at {shared.offset}")
        half = shared.length // 2
        return pb.RawChunk(key=shared.key, dtype=shared.dtype, width=shared.width,
                           keys=data[:half], values=data[half:])

    def __len__(self) -> int:
        return len(self._segments)

    def get(self, transfer_id: str) -> Segment | None:
        return self._segments.get(transfer_id)

    def create(self, transfer_id: str) -> Segment:
        """A new segment for ``transfer_id`` (its lease starts now)."""
        self._count += 1
        segment = Segment(self, transfer_id, f"{PREFIX}{self.instance}-{self._count}",
                          time.monotonic() + self.lease_s)
        old = self._segments.pop(transfer_id, None)
        self._segments[transfer_id] = segment
        if old is not None:
            old.release()
        return segment

    def _forget(self, segment: Segment) -> int:
        if self._segments.get(segment.transfer_id) is segment:
            del self._segments[segment.transfer_id]
        self.held_bytes -= segment.size
        return segment.size

    def release(self, transfer_id: str) -> int:
        """Remove the segment of ``transfer_id`` (0 when there is none)."""
        segment = self._segments.get(transfer_id)
        return segment.release() if segment is not None else 0

    def expire(self, now: float | None = None) -> list[Segment]:
        """Remove every segment past its lease (e.g. its connector died before Release)."""
        now = time.monotonic() if now is None else now
        gone = [s for s in self._segments.values() if s.expires_at <= now]
        for segment in gone:
            segment.release()
        return gone

    def close(self) -> None:
        """Remove every file of this instance."""
        for segment in list(self._segments.values()):
            segment.release()
        for path in (self.directory / self.probe, self._lock_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(self._lock_fd)

    def info(self) -> dict[str, str]:
        """What ``Info`` announces."""
        return {"shm_dir": str(self.directory), "shm_probe": self.probe, "shm_token": self.token}


def chunk_bytes(dtype: str, width: int, tokens: int) -> int:
    """Bytes of a chunk's keys and values."""
    return 2 * tokens * width * _itemsize(dtype)


def _itemsize(dtype: str) -> int:
    torch_dtype = chunks.DTYPES.get(dtype)
    if torch_dtype is None:
        raise ShmError(f"unknown chunk dtype {dtype!r}")
    return torch.empty((), dtype=torch_dtype).element_size()


def read_back(segment: Segment, shared: pb.SharedChunk) -> pb.RawChunk:
    """The chunk a descriptor names, as bytes (for a reader that does not map segments)."""
    data = segment.read(shared.offset, shared.length)
    half = shared.length // 2
    return pb.RawChunk(key=shared.key, dtype=shared.dtype, width=shared.width,
                       keys=data[:half], values=data[half:])


# ---- connector side ----------------------------------------------------------------------


def attach(info: pb.InfoReply, directory: str = "") -> Path | None:
    """The shared directory as this process reaches it, when it sees the sidecar's files
    (it finds the probe's token under ``directory``, default the sidecar's own path);
    None when it does not (or the sidecar has no shared memory)."""
    if not info.shm_dir or not info.shm_probe or not info.shm_token:
        return None
    path = Path(directory or info.shm_dir)
    try:
        found = (path / info.shm_probe).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return path if found == info.shm_token else None


class SegmentReader:
    """The connector's view of its sidecar's segments for one load.
    Each segment is opened once and kept open until the end of the load, so that its
    removal by the sidecar does not take it away while chunks are still read."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._files: dict[str, int] = {}

    def _fd(self, name: str) -> int:
        fd = self._files.get(name)
        if fd is None:
            if not _NAME.fullmatch(name):
                raise ShmError(f"{name!r} is not a segment name")
            try:
                fd = os.open(self.directory / name, os.O_RDONLY)
            except OSError as exc:
                raise ShmError(f"cannot open segment {name} in {self.directory}: "
                               f"{exc.strerror}") from exc
            self._files[name] = fd
        return fd

    def planes(self, shared: pb.SharedChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a descriptor's chunk: views of a private mapping of its
        region (no copy; the mapping goes with the last view). ShmError when the
        descriptor does not fit its segment or its token range."""
        key = shared.key
        tokens = key.token_end - key.token_start
        want = chunk_bytes(shared.dtype, shared.width, tokens) if shared.width else -1
        if shared.length != want or key.token_end < key.token_start:
            raise ShmError(f"descriptor of {shared.length} bytes does not hold {tokens} "
                           f"tokens of {shared.width} {shared.dtype} keys and values")
        if shared.offset % PAGE:
            raise ShmError(f"descriptor offset {shared.offset} is not page-aligned")
        fd = self._fd(shared.segment)
        size = os.fstat(fd).st_size
        if shared.offset + shared.length > size:
            raise ShmError(f"descriptor [{shared.offset}, +{shared.length}) lies past the end "
                           f"of segment {shared.segment} ({size} bytes)")
        if not shared.length:
            empty = torch.empty((0, shared.width), dtype=chunks.DTYPES[shared.dtype])
            return empty, empty
        # Private and writable: torch wants writable memory; nothing is ever written. (No
        # MAP_POPULATE: on a writable private mapping it copies every page.)
        region = mmap.mmap(fd, shared.length, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=shared.offset)
        return chunks.planes(np.frombuffer(region, dtype=np.uint8), shared.dtype, shared.width)

    def close(self) -> None:
        """Close every segment opened (mappings still held stay valid)."""
        for fd in self._files.values():
            os.close(fd)
        self._files = {}


class PutBuffer:
    """The prefill connector's put buffer: a file in the shared directory, held under
    ``flock`` while this process lives, grown to the largest chunk. One Put at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.name = f"{PUT_PREFIX}{secrets.token_hex(8)}"
        self.path = self.directory / self.name
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PUT_MODE)
        os.fchmod(self.fd, PUT_MODE)  # whatever the umask
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        self.size = 0
        self._region: np.ndarray | None = None

    def _room(self, nbytes: int) -> np.ndarray:
        if nbytes > self.size:
            size = max(_aligned(nbytes), 2 * self.size)
            try:
                os.posix_fallocate(self.fd, 0, size)  # room now, not SIGBUS at first touch
            except OSError as exc:
                raise ShmFull(f"no room for a put buffer of {size} bytes: {exc}") from exc
            self._region = None
            self._region = np.frombuffer(mmap.mmap(self.fd, size), dtype=np.uint8)
            self.size = size
        return self._region

    def write(self, key: pb.ChunkKey, k: torch.Tensor, v: torch.Tensor) -> pb.SharedChunk:
        """Copy one chunk's keys then values into the buffer; its descriptor."""
        kb = k.detach().contiguous().view(torch.uint8).numpy().reshape(-1)
        vb = v.detach().contiguous().view(torch.uint8).numpy().reshape(-1)
        region = self._room(kb.size + vb.size)
        region[:kb.size] = kb
        region[kb.size:kb.size + vb.size] = vb
        return pb.SharedChunk(key=key, dtype=chunks.dtype_name(k.dtype), width=k.shape[1],
                              segment=self.name, offset=0, length=kb.size + vb.size)

    def close(self) -> None:
        """Remove the buffer."""
        self._region = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
