"""The codec's Python API: KV caches in, bitstream v1 frames out, and back.

The work happens in the C++ extension (``_codec`` on the CPU, ``_codec_cuda`` on a GPU),
which releases the GIL and spreads streams over threads. This module checks arguments,
lays out planes (layer-major, keys before values), and owns the frame's CRC32C trailer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np

from kvpool.kernels import _codec, levels
from kvpool.kernels.errors import CodecError, ProfileMismatch

if TYPE_CHECKING:
    from kvpool.kernels.profile import Profile

DTYPES = {1: "float16", 2: "bfloat16", 3: "float32"}
"""Header dtype codes (docs/bitstream.md)."""


@dataclass
class KVCache:
    """Per-layer keys and values of a run of tokens.

    keys[i], values[i]: layer i, shape [tokens_i, width_i] (width = kv_heads * head_dim),
    dtype float16, bfloat16 or float32; torch tensors (CPU or CUDA) or numpy arrays
    (float16/float32). Layers may differ in tokens_i (sliding-window layers) and width_i.
    """

    keys: list[Any]
    values: list[Any]


@dataclass(frozen=True)
class ChunkInfo:
    """What a frame's header says (see :func:`peek`)."""

    version: int
    level: str
    lossless: bool
    dtype: str
    layers: list[tuple[int, int]]
    """(tokens, width) of each layer; keys and values share it."""
    bins: list[tuple[int, int, int, int]]
    """Per layer: key bins, value bins, key anchor bins, value anchor bins (0 = unused)."""
    profile_hash: str | None
    exact_rows: int
    """Leading rows of every layer stored verbatim (the sequence's first tokens)."""
    contexts: bool
    """Whether the symbol above chooses each symbol's table (a profile's context tables)."""
    raw_bytes: int
    """Size of the decoded keys and values in the chunk's dtype."""
    encoded_bytes: int
    """Size of the whole frame, checksum included."""


FLAG_PROFILE = 1
"""Header flag: the chunk's statistics and tables come from a profile."""
FLAG_CONTEXTS = 2
"""Header flag: the symbol above chooses each symbol's table (context tables of a profile)."""


def default_threads() -> int:
    """Threads for the CPU path: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _plane(x: Any) -> Any:
    try:
        import torch
    except ImportError:  # numpy-only installs
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise CodecError(f"each key/value must be 2-D [tokens, width], not {tuple(x.shape)}")
        return x.detach().contiguous()
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise CodecError(f"each key/value must be 2-D [tokens, width], not {x.shape}")
        if x.dtype not in (np.float16, np.float32):
            raise CodecError(f"numpy arrays must be float16 or float32, not {x.dtype}")
        return np.ascontiguousarray(x)
    raise CodecError(f"keys and values must be torch tensors or numpy arrays, not {type(x)}")


def _planes(kv: KVCache) -> list[Any]:
    if len(kv.keys) != len(kv.values):
        raise CodecError(f"{len(kv.keys)} key layers but {len(kv.values)} value layers")
    if len(kv.keys) > 0xFFFF:
        raise CodecError("at most 65535 layers")
    planes = []
    for i, (k, v) in enumerate(zip(kv.keys, kv.values)):
        k, v = _plane(k), _plane(v)
        if tuple(k.shape) != tuple(v.shape):
            raise CodecError(f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ")
        planes += [k, v]
    dtypes = {str(p.dtype).removeprefix("torch.") for p in planes}
    if len(dtypes) > 1:
        raise CodecError(f"all layers must share one dtype, not {sorted(dtypes)}")
    return planes


def _on_cuda(planes: list[Any]) -> bool:
    devices = {getattr(getattr(p, "device", None), "type", "cpu") for p in planes}
    if len(devices) > 1:
        raise CodecError(f"all layers must be on one device, not {sorted(devices)}")
    return devices == {"cuda"}


def table_group(tokens: int, level: levels.Level) -> int:
    """Channels sharing one probability table in a chunk that carries its own tables:
    enough that a table's 2 bytes per bin stay near 1 % of the coded bits it serves."""
    if not tokens:
        return 1
    biggest = max((b for _, b in level.all_bins(neighbours=False)), default=3)
    group = 1
    while group * tokens < 256 * biggest and group < 4096:
        group *= 2
    return group


def _cuda():
    try:
        from kvpool.kernels import _codec_cuda
    except ImportError as exc:
        raise CodecError(f"the CUDA path is not built in this install: {exc}") from exc
    if not _codec_cuda.device_count():
        raise CodecError("no CUDA device")
    return _codec_cuda


def encode(
    kv: KVCache,
    level: str = "default",
    profile: Profile | None = None,
    *,
    threads: int | None = None,
    depth: tuple[int, int] | None = None,
    position: int = 0,
) -> bytes:
    """One chunk -> one self-delimiting bitstream v1 frame (docs/bitstream.md).

    ``depth=(first, count)`` says that the chunk's layers are layers ``first, first + 1, ...``
    of a model of ``count`` layers, for the level's bins-over-depth schedule (a chunk of one
    layer of a model, as the sidecar sends them); by default the chunk holds every layer of
    the model. The bins land in the header, so decoding needs no such argument.
    ``position`` is the sequence position of the chunk's first token: the rows of the
    sequence's first ``sink_tokens`` tokens (the level's) are stored exact.

    Releases the GIL. With a profile (lossy levels), the frame names the profile's hash (for
    some of the model's layers, the hash of that slice of it) and carries no tables or
    channel statistics; without one it carries its own. ``lossless``
    codes the raw values (bit-exact round trip) and never uses a profile. CUDA tensors are
    encoded on their GPU; the frame is byte-identical to the CPU's.
    """
    lv = levels.get(level)
    if position < 0:
        raise CodecError(f"position must be >= 0, not {position}")
    planes = _planes(kv)
    n = len(planes) // 2
    first, count = (0, n) if depth is None else depth
    if not (0 <= first and first + n <= count):
        raise CodecError(f"depth={depth}: {n} layers from layer {first} do not fit in {count}")
    use_profile = profile is not None and not lv.lossless
    if use_profile and 2 * count != len(profile.widths):
        raise CodecError(f"profile {profile.hash} is for {len(profile.widths) // 2} layers, "
                         f"the model has {count}")
    steps = profile.steps(lv) if use_profile else []
    if len(steps) != 2 * count:  # bins follow the model's sensitivity
        steps = [0] * (2 * count)
    layers = [(int(planes[2 * i].shape[0]), int(planes[2 * i].shape[1]),
               *lv.layer_bins(first + i, count, (steps[2 * (first + i)], steps[2 * (first + i) + 1])))
              for i in range(n)]
    contexts = use_profile and lv.anchor_group == 1 and profile.has_contexts(layers, first)
    group = 1 if lv.lossless or use_profile else table_group(max((t for t, *_ in layers), default=0), lv)
    args = {
        "lossless": lv.lossless,
        "level": lv.name,
        "block_tokens": levels.BLOCK_TOKENS,
        "group_channels": levels.GROUP_CHANNELS,
        "anchor_group": lv.anchor_group,
        "table_group": group,
        "exact_rows": max(0, lv.sink_tokens - position),
        "layers": layers,
        "profile_hash": bytes.fromhex(profile.slice_hash(first, n)) if use_profile else None,
        "contexts": contexts,
    }
    tables = profile.compiled(lv.anchor_group, layers, contexts, first) if use_profile else None
    if _on_cuda(planes):
        frame = _cuda().encode(planes, profile=tables, **args)
    else:
        frame = _codec.encode(planes, profile=tables, threads=threads or default_threads(), **args)
    body = frame[:-4]
    return body + google_crc32c.value(body).to_bytes(4, "little")


def _buffer(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The frame's bytes as a uint8 array: read in place when they cannot change (bytes, a
    read-only view of them), else copied first (the checksum is checked once, then the
    decoder reads them without the GIL)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"a frame is bytes, not {type(data).__name__}")
    if isinstance(data, bytearray) or not memoryview(data).readonly:
        data = bytes(data)
    return np.frombuffer(data, dtype=np.uint8)


def _header(view: np.ndarray) -> dict[str, Any]:
    return _codec.parse(view)


def _raw_bytes(h: dict[str, Any]) -> int:
    """Bytes of the keys and values a parsed header describes, in the frame's dtype."""
    elem = {1: 2, 2: 2, 3: 4}[h["dtype"]]
    return sum(2 * t * w * elem for t, w, *_ in h["layers"])


def peek(data: bytes | bytearray | memoryview) -> ChunkInfo:
    """The header of a frame (a prefix holding the header is enough; the checksum is not
    verified here). Raises CodecError when the header is malformed."""
    view = _buffer(data)
    h = _header(view)
    zero = bytes(16)
    return ChunkInfo(
        version=int(view[4]),
        level=h["level"],
        lossless=h["mode"] == 0,
        dtype=DTYPES[h["dtype"]],
        layers=[(t, w) for t, w, *_ in h["layers"]],
        bins=[tuple(b) for *_, b0, b1, b2, b3 in h["layers"] for b in [(b0, b1, b2, b3)]],
        profile_hash=None if h["profile_hash"] == zero else h["profile_hash"].hex(),
        exact_rows=h["exact_rows"],
        contexts=bool(h["flags"] & FLAG_CONTEXTS),
        raw_bytes=_raw_bytes(h),
        encoded_bytes=h["frame_size"],
    )


def _verify(raw: np.ndarray) -> None:
    if len(raw) < 4:
        raise CodecError("truncated bitstream: shorter than its checksum")
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:].tobytes(), "little"):
        # Say "truncated" when the header knows the frame is longer than what we got.
        try:
            size = _codec.parse(raw)["frame_size"]
        except CodecError:
            size = None
        if size is not None and size > len(raw):
            raise CodecError(f"truncated bitstream: {len(raw)} of {size} bytes")
        raise CodecError("corrupt bitstream: checksum mismatch")


def decode(
    data: bytes | bytearray | memoryview,
    profile: Profile | None = None,
    *,
    device: str = "cpu",
    threads: int | None = None,
    max_raw_bytes: int | None = None,
    out: list[Any] | None = None,
) -> KVCache:
    """The inverse of :func:`encode`: torch tensors on ``device`` in the chunk's dtype.

    ``out``: tensors to decode into instead of new ones (keys then values of each layer,
    i.e. ``[k0, v0, k1, v1, ...]``, each contiguous ``[tokens, width]`` in the frame's
    dtype, e.g. views of a shared-memory segment); CodecError when they do not fit.

    Any truncated, corrupt or hostile input raises CodecError (never a crash, never
    silently wrong data). A chunk naming a profile needs that profile (else
    ProfileMismatch, a CodecError).
    ``max_raw_bytes`` bounds what a frame may decode to (a small frame can stand for up to
    ~500 times its size): a frame whose header asks for more is refused before anything
    is allocated.
    """
    import torch

    view = _buffer(data)
    _verify(view)
    h = _header(view)
    raw_bytes = _raw_bytes(h)
    if max_raw_bytes is not None and raw_bytes > max_raw_bytes:
        raise CodecError(f"the frame decodes to {raw_bytes} bytes, more than the "
                         f"{max_raw_bytes} allowed")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise CodecError(f"cannot decode onto device {device!r}")
    tables = None
    if h["flags"] & FLAG_PROFILE:
        want = h["profile_hash"].hex()
        if profile is None:
            raise ProfileMismatch(f"the chunk needs profile {want}; none given")
        first = profile.locate(want, len(h["layers"]))
        if first is None:
            raise ProfileMismatch(f"the chunk needs profile {want}, not {profile.hash}")
        tables = profile.compiled(h["anchor_group"], h["layers"],
                                  bool(h["flags"] & FLAG_CONTEXTS), first)
    dtype = getattr(torch, DTYPES[h["dtype"]])
    gpu = _cuda() if dev.type == "cuda" else None
    if out is not None:
        outs = _outputs(out, h["layers"], dtype, dev)
    else:
        outs = [torch.empty((t, w), dtype=dtype, device=dev)
                for t, w, *_ in h["layers"] for _ in range(2)]
    if gpu is not None:
        gpu.decode(view, outs, tables)
    else:
        _codec.decode(view, outs, tables, threads or default_threads())
    return KVCache(keys=outs[0::2], values=outs[1::2])


def _outputs(out: list[Any], layers: list, dtype: Any, dev: Any) -> list[Any]:
    """``out`` checked against a frame's planes (one per key and value plane of each layer)."""
    shapes = [(t, w) for t, w, *_ in layers for _ in range(2)]
    if len(out) != len(shapes):
        raise CodecError(f"the frame has {len(shapes)} planes, {len(out)} outputs given")
    for o, shape in zip(out, shapes):
        if (tuple(o.shape) != shape or o.dtype != dtype or o.device != dev
                or not o.is_contiguous()):
            raise CodecError(f"output {tuple(o.shape)} {o.dtype} on {o.device} does not fit "
                             f"a plane {shape} {dtype} on {dev} (contiguous)")
    return list(out)


def raw_nbytes(kv: KVCache) -> int:
    """Bytes of the keys and values as they are (fp16 equivalent: 2 bytes per element)."""
    return sum(int(np.prod(tuple(x.shape))) * 2 for x in [*kv.keys, *kv.values])


__all__ = ["ChunkInfo", "CodecError", "KVCache", "decode", "encode", "peek", "table_group"]
