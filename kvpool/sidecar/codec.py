"""How the sidecar codes a chunk for the wire: ``raw`` or a CacheGen level of the codec.

``raw`` ships the chunk's tensors as they are (a serialized :class:`RawChunk`): the
baseline, and what works without the codec extension. Every other level is a level of
:mod:`kvpool.kernels` (``lossless`` is bit-exact; ``default`` is the lossy default).
Both directions take and return one layer's chunk as a :class:`RawChunk` message.

With a model profile (``kvpool profile``; the sidecar's ``--profile``), lossy chunks of that
model code with the profile's statistics and tables for their layer (rate-distortion bins,
context tables, nothing carried in the chunk); the decoding side needs the same profile
(else :class:`ProfileMismatch`, reason ``profile_mismatch``: decode recomputes).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from kvpool.sidecar import chunks
from kvpool.sidecar.proto import sidecar_pb2 as pb

log = logging.getLogger(__name__)

RAW = "raw"
"""The level that ships tensors uncompressed."""


class ChunkCodecError(ValueError):
    """A chunk could not be encoded or decoded (unknown level, corrupt payload)."""

    reason = "codec"
    """The failure reason of a transfer that meets this error (metrics, health)."""


class ProfileMismatch(ChunkCodecError):
    """A chunk coded with a model profile this side does not hold (no ``--profile``, or
    another file): the sidecars of a pair need the same profile."""

    reason = "profile_mismatch"


def _decode_error(kernels, exc: Exception) -> ChunkCodecError:
    """The sidecar's error for the codec's ``exc`` raised while decoding a chunk."""
    if isinstance(exc, kernels.ProfileMismatch):
        return ProfileMismatch(f"{exc} (both sidecars of a pair need the same --profile)")
    return ChunkCodecError(str(exc))


@functools.cache
def _kernels():
    try:
        from kvpool import kernels
    except ImportError as exc:  # a broken build of the extension
        raise ChunkCodecError(f"the codec cannot be loaded: {exc}") from exc
    if not hasattr(kernels, "encode"):
        raise ChunkCodecError("the codec is not built in this installation (make kernels)")
    return kernels


def levels() -> tuple[str, ...]:
    """Every level this installation can code: ``raw`` first, then the codec's."""
    try:
        return (RAW, *_kernels().LEVELS)
    except ChunkCodecError:
        return (RAW,)


def check_level(level: str) -> str:
    if level not in levels():
        raise ChunkCodecError(f"unknown transfer level {level!r}; available: {levels()}")
    return level


def load_profile(path: str):
    """The codec profile in the file at ``path`` (ChunkCodecError when it cannot be used)."""
    kernels = _kernels()
    try:
        return kernels.Profile.load(path)
    except (OSError, kernels.CodecError) as exc:
        raise ChunkCodecError(f"cannot use profile {path}: {exc}") from exc


@functools.cache
def _warn_once(profile: str, level: str, why: str) -> None:
    log.warning("profile %s cannot code level %s, chunks carry their own tables: %s",
                profile, level, why)


def _fits(profile, chunk: pb.RawChunk, num_layers: int) -> bool:
    widths = profile.widths
    layer = chunk.key.layer
    return (2 * num_layers == len(widths) and layer < num_layers
            and widths[2 * layer] == widths[2 * layer + 1] == chunk.width)


def encode(chunk: pb.RawChunk, level: str, num_layers: int = 0, profile=None) -> bytes:
    """One layer's keys and values (a RawChunk) -> payload bytes.

    ``num_layers`` (the model's; 0 = unknown) places the chunk's layer (``chunk.key.layer``)
    in the level's bins-over-depth schedule; unknown, the chunk codes as a model's layer 0.
    The chunk's first token (``chunk.key.token_start``) tells the codec which rows are the
    sequence's first tokens, which lossy levels keep exact. ``profile`` is used when it is
    the profile of a model of this shape (else the chunk carries its own tables).
    """
    if level == RAW:
        return pb.RawChunk(
            dtype=chunk.dtype, width=chunk.width, keys=chunk.keys, values=chunk.values
        ).SerializeToString()
    kernels = _kernels()
    try:
        depth = (chunk.key.layer, num_layers) if num_layers else None
        kv = to_kvcache(chunk)
        if profile is not None and _fits(profile, chunk, num_layers):
            try:
                return kernels.encode(kv, level=level, profile=profile, depth=depth,
                                      position=chunk.key.token_start)
            except kernels.CodecError as exc:  # e.g. made before this level's bins existed
                _warn_once(profile.hash, level, str(exc))
        return kernels.encode(kv, level=level, depth=depth, position=chunk.key.token_start)
    except (ValueError, kernels.CodecError) as exc:
        raise ChunkCodecError(f"cannot encode chunk: {exc}") from exc


def to_kvcache(chunk: pb.RawChunk):
    """One layer's chunk as the codec's ``KVCache`` (ValueError when its sizes do not fit)."""
    kernels = _kernels()
    keys = chunks.from_bytes(chunk.keys, chunk.dtype, chunk.width)
    values = chunks.from_bytes(chunk.values, chunk.dtype, chunk.width)
    return kernels.KVCache(keys=[keys], values=[values])


def decode(payload: bytes, level: str, profile=None) -> pb.RawChunk:
    """The inverse of :func:`encode` (the key left empty); ChunkCodecError when malformed,
    ProfileMismatch when it names a profile other than ``profile``."""
    if level == RAW:
        raw = pb.RawChunk()
        try:
            raw.ParseFromString(payload)
            keys = chunks.from_bytes(raw.keys, raw.dtype, raw.width)
            values = chunks.from_bytes(raw.values, raw.dtype, raw.width)
        except Exception as exc:  # protobuf DecodeError or a size that does not fit
            raise ChunkCodecError(f"corrupt raw chunk: {exc}") from exc
        if keys.shape != values.shape:
            raise ChunkCodecError("corrupt raw chunk: keys and values differ in shape")
        return raw
    kernels = _kernels()
    try:
        kv = kernels.decode(payload, profile)
    except kernels.CodecError as exc:
        raise _decode_error(kernels, exc) from exc
    if len(kv.keys) != 1 or len(kv.values) != 1:
        raise ChunkCodecError(f"a chunk holds one layer, this one {len(kv.keys)}")
    keys, values = torch.as_tensor(kv.keys[0]), torch.as_tensor(kv.values[0])
    return pb.RawChunk(
        dtype=chunks.dtype_name(keys.dtype),
        width=keys.shape[1],
        keys=chunks.to_bytes(keys),
        values=chunks.to_bytes(values),
    )


def decode_into(payload: bytes, level: str, region: np.ndarray, profile=None) -> tuple[str, int]:
    """Decode a chunk into ``region`` (uint8, exactly the size of its keys then values,
    e.g. a shared-memory mapping): the codec writes there directly, a raw chunk is copied
    once. Returns the chunk's dtype name and width; ChunkCodecError when malformed or when
    its size is not the region's, ProfileMismatch as :func:`decode`."""
    if level == RAW:
        raw = decode(payload, RAW)
        if len(raw.keys) + len(raw.values) != len(region):
            raise ChunkCodecError(f"a raw chunk of {len(raw.keys) + len(raw.values)} bytes "
                                  f"said it holds {len(region)}")
        half = len(raw.keys)
        region[:half] = np.frombuffer(raw.keys, dtype=np.uint8)
        region[half:] = np.frombuffer(raw.values, dtype=np.uint8)
        return raw.dtype, raw.width
    kernels = _kernels()
    try:
        info = kernels.peek(payload)
        if len(info.layers) != 1:
            raise ChunkCodecError(f"a chunk holds one layer, this one {len(info.layers)}")
        if info.raw_bytes != len(region):
            raise ChunkCodecError(f"a chunk decoding to {info.raw_bytes} bytes said it "
                                  f"holds {len(region)}")
        width = info.layers[0][1]
        kernels.decode(payload, profile, out=list(chunks.planes(region, info.dtype, width)))
    except kernels.CodecError as exc:
        raise _decode_error(kernels, exc) from exc
    return info.dtype, width
