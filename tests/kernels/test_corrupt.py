"""Truncated, corrupt and hostile frames raise CodecError: never a crash, never data.

Random bytes are stopped by the checksum, so most cases here re-seal the frame with a
valid CRC32C after damaging it: the C++ parser and stream decoder must catch them alone.
"""

from __future__ import annotations

import struct

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool.kernels import CodecError, KVCache, ProfileMismatch, decode, encode, peek

from .conftest import frame_with_bad_table, synthetic_kv


def seal(body: bytes) -> bytes:
    """``body`` (a frame without its checksum) with a valid CRC32C appended."""
    return body + google_crc32c.value(body).to_bytes(4, "little")


@pytest.fixture(scope="module", params=["lossless", "default", "lowest"])
def frame(request) -> bytes:
    return encode(synthetic_kv([(130, 96), (64, 64)]), request.param)


def test_every_truncation_is_rejected(frame: bytes) -> None:
    for n in [*range(64), *range(64, len(frame), max(1, len(frame) // 200))]:
        with pytest.raises(CodecError):
            decode(frame[:n])


def test_trailing_bytes_are_rejected(frame: bytes) -> None:
    with pytest.raises(CodecError):
        decode(frame + b"\0")
    with pytest.raises(CodecError, match="corrupt"):
        decode(seal(frame[:-4] + b"\0"))


def test_bit_flips_fail_the_checksum(frame: bytes) -> None:
    for i in range(0, len(frame), max(1, len(frame) // 300)):
        bad = bytearray(frame)
        bad[i] ^= 1 << (i % 8)
        with pytest.raises(CodecError):
            decode(bytes(bad))


def test_resealed_bit_flips_never_pass_silently(frame: bytes) -> None:
    """With a valid checksum, a flipped bit either raises or decodes to a chunk of the
    same shape (a flip inside a scale or a symbol can yield another valid frame)."""
    body = frame[:-4]
    for i in range(0, len(body), max(1, len(body) // 400)):
        bad = bytearray(body)
        bad[i] ^= 1 << (i % 8)
        try:
            decode(seal(bytes(bad)))
        except CodecError:
            pass


def test_header_rules() -> None:
    body = bytearray(encode(synthetic_kv([(20, 16)]), "default")[:-4])
    cases = {
        "magic": (0, b"XVPC"),
        "version": (4, b"\x02"),
        "mode": (5, b"\x07"),
        "dtype": (6, b"\x00"),
        "flags": (7, b"\x04"),
        "contexts without a profile": (7, b"\x02"),
        "block": (10, b"\0\0"),
        "group": (12, struct.pack("<H", 257)),
        "anchor": (14, struct.pack("<H", 3)),
        "profile flag without hash": (7, b"\x01"),
    }
    for at, value in cases.values():
        bad = bytearray(body)
        bad[at : at + len(value)] = value
        with pytest.raises(CodecError):
            decode(seal(bytes(bad)))
        with pytest.raises(CodecError):
            peek(bytes(bad))


def test_exact_rows_in_a_lossless_frame_are_refused() -> None:
    body = bytearray(encode(synthetic_kv([(20, 16)]), "lossless")[:-4])
    body[19] = 4
    with pytest.raises(CodecError):
        decode(seal(bytes(body)))
    with pytest.raises(CodecError):
        peek(bytes(body))


def test_max_raw_bytes_bounds_what_a_frame_decodes_to() -> None:
    kv = synthetic_kv([(20, 16)])
    data = encode(kv, "default")
    raw = peek(data).raw_bytes
    assert decode(data, max_raw_bytes=raw).keys[0].shape == (20, 16)
    with pytest.raises(CodecError, match="more than"):
        decode(data, max_raw_bytes=raw - 1)


def test_hostile_sizes_do_not_allocate() -> None:
    """A header promising 2^32-1 tokens per layer and huge sections is refused before
    anything is allocated."""
    body = bytearray(encode(synthetic_kv([(20, 16)]), "default")[:-4])
    name_len = body[18]
    layer = 36 + name_len
    body[layer : layer + 4] = struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(CodecError):
        decode(seal(bytes(body)))
    body[layer + 4 : layer + 8] = struct.pack("<I", 0xFFFFFFFF)
    sections = layer + 12
    body[sections : sections + 8] = struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF)
    with pytest.raises(CodecError):
        decode(seal(bytes(body)))


def test_profile_chunk_needs_its_profile(profile_samples) -> None:
    from kvpool.kernels import Profile

    profile = Profile.build(profile_samples, model="synthetic")
    kv = profile_samples[0]
    data = encode(kv, "default", profile)
    with pytest.raises(ProfileMismatch, match="needs profile"):
        decode(data)
    other = Profile.build(profile_samples[1:], model="synthetic")
    with pytest.raises(ProfileMismatch, match="needs profile"):
        decode(data, other)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), level=st.sampled_from(["lossless", "default"]))
def test_mutated_frames_with_valid_checksum(data, level) -> None:
    body = bytearray(_FRAMES[level][:-4])
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["set", "insert", "delete"]))
        at = data.draw(st.integers(0, len(body)))
        if kind == "set" and at < len(body):
            body[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif at < len(body):
            del body[at : at + data.draw(st.integers(1, 8))]
    try:
        out = decode(seal(bytes(body)))
    except CodecError:
        return
    assert isinstance(out, KVCache)


_FRAMES = {
    level: encode(synthetic_kv([(40, 24), (9, 8)]), level) for level in ("lossless", "default")
}


def test_a_table_with_a_zero_frequency_is_refused() -> None:
    with pytest.raises(CodecError, match="corrupt"):
        decode(frame_with_bad_table())
