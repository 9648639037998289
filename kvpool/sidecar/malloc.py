"""glibc malloc settings for a process that streams large messages (a sidecar).

gRPC and protobuf allocate a buffer of a message's size for each copy they make of it
(a chunk is up to a few MiB). glibc serves such blocks with fresh ``mmap`` mappings (above
its mmap threshold, 128 KiB at first) and hands freed memory at the top of its heaps back
to the kernel (above its trim threshold), so every copy of every message writes into
pages the kernel must fault in and zero first: on the Peer stream that cost as much CPU
as the copies themselves. :func:`tune` keeps such blocks in the heaps and freed memory in
the process for reuse; what it keeps is bounded by ``trim_bytes`` per heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's largest mmap threshold on 64-bit (blocks above it are always mapped)."""


@functools.cache
def tune(trim_bytes: int = 256 << 20, top_pad_bytes: int = 16 << 20) -> bool:
    """Serve blocks up to 32 MiB from the heaps and keep up to ``trim_bytes`` of freed
    memory; True when applied (glibc), False elsewhere (musl, macOS: nothing to do)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        (M_TRIM_THRESHOLD, trim_bytes),
        (M_TOP_PAD, top_pad_bytes),
    ))  # fmt: skip
