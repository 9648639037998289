"""Round trips over levels, dtypes and shapes: lossless is bit-exact, lossy stays within
the quantization step, and the bytes do not depend on the number of threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool.kernels import LEVELS, CodecError, KVCache, _codec, decode, encode, levels, peek
from kvpool.kernels.codec import raw_nbytes

from .conftest import as_numpy, synthetic_kv

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LOSSY = [name for name in LEVELS if name != "lossless"]


def bf16(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)


def plane_steps(data: bytes) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per plane of a self-contained quantized frame: (exact rows, sigma [width], scale
    [coded rows]), read from its sections as docs/bitstream.md lays them out."""
    h = _codec.parse(np.frombuffer(data, np.uint8))
    elem = {1: 2, 2: 2, 3: 4}[h["dtype"]]
    out, at = [], h["header_size"]
    for p in range(2 * len(h["layers"])):
        tokens, width, *bins = h["layers"][p // 2]
        exact = min(h["exact_rows"], tokens)
        sec = at + exact * width * elem
        tokens -= exact
        delta, anchor = bins[p % 2], bins[2 + p % 2]
        tables = -(-width // h["table_group"]) * 2 * (anchor + delta)
        sigma = bf16(data[sec + 2 * width : sec + 4 * width])
        scale = bf16(data[sec + 4 * width + tables : sec + 4 * width + tables + 2 * tokens])
        out.append((exact, sigma, scale))
        at += int.from_bytes(data[h["header_size"] - 8 * len(h["layers"]) + 4 * p :][:4], "little")
    return out


def check_bound(kv: KVCache, out: KVCache, data: bytes, dtype: torch.dtype) -> None:
    """Exact rows decode exactly; every other decoded value lies within half a quantization
    step (sigma[c] * scale[t] / 2) of its input, plus the output dtype's rounding
    (docs/bitstream.md, "Quantizer")."""
    ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[dtype]
    planes = [x for pair in zip(kv.keys, kv.values) for x in pair]
    decoded = [x for pair in zip(out.keys, out.values) for x in pair]
    for p, ((exact, sigma, scale), x, y) in enumerate(zip(plane_steps(data), planes, decoded)):
        x, y = as_numpy(x).astype(np.float64), as_numpy(y).astype(np.float64)
        assert np.array_equal(x[:exact], y[:exact]), f"plane {p}: exact rows differ"
        x, y = x[exact:], y[exact:]
        if not x.size:
            continue
        rounding = np.maximum(np.abs(x), np.abs(y)) * ulp * 1.01
        bound = sigma[None, :] * scale[:, None] / 2 * (1 + 1e-5) + rounding + 1e-30
        assert np.all(np.abs(y - x) <= bound), f"plane {p}: error above half a step"


def test_decode_into_given_tensors_matches_and_checks_their_shapes() -> None:
    kv = synthetic_kv([(70, 48), (9, 80)], torch.bfloat16)
    data = encode(kv, "default")
    want = decode(data)
    out = [torch.empty_like(p) for p in (want.keys[0], want.values[0],
                                         want.keys[1], want.values[1])]
    got = decode(data, out=out)
    assert got.keys[0] is out[0] and got.values[1] is out[3]
    assert all(torch.equal(a, b) for a, b in zip(out, [*want.keys[:1], *want.values[:1],
                                                       want.keys[1], want.values[1]]))
    for bad in ([*out[:3]], [out[0], out[1], out[2], out[3].float()],
                [out[2], out[3], out[0], out[1]], [out[0].t(), *out[1:]]):
        with pytest.raises(CodecError, match="output|outputs"):
            decode(data, out=bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lossless_is_bit_exact(dtype: torch.dtype) -> None:
    kv = synthetic_kv([(70, 48), (3, 48), (129, 80)], dtype)
    out = decode(encode(kv, "lossless"))
    for a, b in zip([*kv.keys, *kv.values], [*out.keys, *out.values]):
        assert b.dtype == dtype
        assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           b.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_lossless_keeps_nan_inf_and_negative_zero() -> None:
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 65504.0, 6e-8]] * 5,
                     dtype=torch.float16)
    kv = KVCache(keys=[x], values=[x.flip(1)])
    out = decode(encode(kv, "lossless"))
    assert torch.equal(out.keys[0].view(torch.int16), x.view(torch.int16))


@pytest.mark.parametrize("level", LOSSY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lossy_error_within_quantization_step(level: str, dtype: torch.dtype) -> None:
    kv = synthetic_kv([(200, 96), (65, 64), (1, 32)], dtype)
    data = encode(kv, level)
    out = decode(data)
    assert [tuple(t.shape) for t in out.keys] == [tuple(t.shape) for t in kv.keys]
    assert all(t.dtype == dtype for t in [*out.keys, *out.values])
    check_bound(kv, out, data, dtype)
    assert peek(data).level == level


DELTA = levels.Level(
    "delta16",
    anchor_group=16,
    key_bins=((0.5, 63), (1.0, 31)),
    value_bins=((1.0, 31),),
    key_delta_bins=((1.0, 15),),
    value_delta_bins=((0.5, 11), (1.0, 7)),
)


@pytest.fixture
def delta_level(monkeypatch) -> str:
    """A level with anchor groups (differences to the group's first row)."""
    monkeypatch.setattr(levels, "LEVEL_TABLE", (*levels.LEVEL_TABLE, DELTA))
    return DELTA.name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_anchor_groups_round_trip_within_the_step(delta_level: str, dtype: torch.dtype) -> None:
    kv = synthetic_kv([(200, 96), (70, 64), (16, 8), (17, 8)], dtype)
    data = encode(kv, delta_level)
    assert peek(data).bins[0] == (15, 11, 63, 31)
    check_bound(kv, decode(data), data, dtype)


def test_anchor_groups_with_a_profile(delta_level: str, profile_samples) -> None:
    from kvpool.kernels import Profile

    profile = Profile.build(profile_samples, model="synthetic")
    kv = profile_samples[2]
    data = encode(kv, delta_level, profile)
    assert len(data) < len(encode(kv, delta_level))
    out = decode(data, profile)
    assert all(o.shape == k.shape for o, k in zip(out.keys, kv.keys))


SINKS = levels.Level("sinks", key_bins=((1.0, 15),), value_bins=((1.0, 11),), sink_tokens=4)


@pytest.mark.parametrize("position", [0, 1, 3, 4, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_sequence_first_tokens_stay_exact(monkeypatch, position: int, dtype) -> None:
    """Rows of positions below the level's sink_tokens are stored verbatim; the others are
    quantized, with channel ranges that the exact rows do not widen."""
    monkeypatch.setattr(levels, "LEVEL_TABLE", (*levels.LEVEL_TABLE, SINKS))
    kv = synthetic_kv([(70, 64), (2, 64), (0, 64)], dtype)
    kv.keys[0][0] *= 1000  # an attention sink: far outside every other row's range
    data = encode(kv, "sinks", position=position)
    exact = max(0, 4 - position)
    assert peek(data).exact_rows == exact
    out = decode(data)
    check_bound(kv, out, data, dtype)
    if exact:
        assert torch.equal(out.keys[0][:exact], kv.keys[0][:exact])
        assert torch.equal(out.values[1][:exact], kv.values[1][:exact])  # rows of 2 rows
        sigma = plane_steps(data)[0][1]
        assert sigma.max() < 100, "the sink row widened the channel ranges"


def test_exact_rows_with_a_profile(monkeypatch, profile_samples) -> None:
    from kvpool.kernels import Profile

    monkeypatch.setattr(levels, "LEVEL_TABLE", (*levels.LEVEL_TABLE, SINKS))
    profile = Profile.build(profile_samples, model="synthetic")
    kv = profile_samples[1]
    out = decode(encode(kv, "sinks", profile), profile)
    for a, b in zip([*kv.keys, *kv.values], [*out.keys, *out.values]):
        assert torch.equal(torch.as_tensor(a)[:4], b[:4])


def test_levels_order_ratio() -> None:
    kv = synthetic_kv([(256, 128)] * 4)
    sizes = [len(encode(kv, name)) for name in LEVELS]
    assert sizes == sorted(sizes, reverse=True), dict(zip(LEVELS, sizes))
    print("ratios vs fp16:", {n: round(raw_nbytes(kv) / s, 2) for n, s in zip(LEVELS, sizes)})


def test_numpy_inputs_match_torch() -> None:
    kv = synthetic_kv([(50, 32), (50, 32)])
    as_np = KVCache(keys=[k.numpy() for k in kv.keys], values=[v.numpy() for v in kv.values])
    assert encode(kv, "default") == encode(as_np, "default")


@pytest.mark.parametrize("level", ["lossless", "default"])
def test_threads_produce_identical_bytes(level: str) -> None:
    kv = synthetic_kv([(300, 128), (300, 128), (150, 64)])
    one = encode(kv, level, threads=1)
    assert encode(kv, level, threads=2) == one
    assert encode(kv, level, threads=7) == one
    a, b = decode(one, threads=1), decode(one, threads=5)
    assert all(torch.equal(x, y) for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]))


def test_depth_picks_the_bins_of_the_model_layer(monkeypatch) -> None:
    """A chunk of one layer of a deep model gets that layer's bins from the level's schedule,
    the same as when the chunk holds every layer."""
    level = levels.Level("deep", key_bins=((0.5, 31), (1.0, 15)), value_bins=((1.0, 11),))
    monkeypatch.setattr(levels, "LEVEL_TABLE", (*levels.LEVEL_TABLE, level))
    whole = peek(encode(synthetic_kv([(32, 64)] * 10), "deep")).bins
    assert whole == [level.layer_bins(i, 10) for i in range(10)]
    assert whole[0] != whole[9]  # the schedule changes over the depth
    for i in (0, 1, 9):
        one = encode(synthetic_kv([(32, 64)], seed=i), "deep", depth=(i, 10))
        assert peek(one).bins == [whole[i]]
        assert decode(one).keys[0].shape == (32, 64)
    assert peek(encode(synthetic_kv([(32, 64)] * 2), "deep", depth=(8, 10))).bins == whole[8:]
    for bad in ((9, 10), (-1, 10), (0, 1)):
        with pytest.raises(CodecError, match="do not fit"):
            encode(synthetic_kv([(32, 64)] * 2), "deep", depth=bad)


def test_empty_and_tiny_shapes() -> None:
    for layers in ([], [(0, 0)], [(0, 64)], [(5, 0)], [(1, 1)], [(1, 300), (0, 8)]):
        kv = synthetic_kv(layers)
        for level in ("lossless", "default"):
            data = encode(kv, level)
            out = decode(data)
            assert [tuple(t.shape) for t in out.values] == [tuple(t.shape) for t in kv.values]
            info = peek(data)
            assert info.encoded_bytes == len(data)
            assert info.layers == [tuple(s) for s in layers]


def test_constant_and_zero_planes_decode_exactly() -> None:
    zeros = torch.zeros(40, 16, dtype=torch.float16)
    const = torch.full((40, 16), 3.5, dtype=torch.float16)
    out = decode(encode(KVCache(keys=[zeros], values=[const]), "lowest"))
    assert torch.equal(out.keys[0], zeros) and torch.equal(out.values[0], const)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.tuples(st.integers(0, 140), st.integers(0, 140)), min_size=0, max_size=4),
    level=st.sampled_from(LEVELS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
def test_roundtrip_property(shapes, level, dtype, seed) -> None:
    kv = synthetic_kv(shapes, dtype, seed)
    data = encode(kv, level)
    info = peek(data)
    assert info.encoded_bytes == len(data)
    assert info.raw_bytes == raw_nbytes(kv) * (2 if dtype == torch.float32 else 1)
    out = decode(data)
    if level == "lossless":
        for a, b in zip([*kv.keys, *kv.values], [*out.keys, *out.values]):
            assert torch.equal(a, b)
    else:
        check_bound(kv, out, data, dtype)


def test_non_finite_values_need_lossless() -> None:
    x = torch.ones(8, 8, dtype=torch.float16)
    x[5, 3] = float("inf")  # a quantized row (rows 0-3 of a sequence are stored exact)
    from kvpool.kernels import CodecError

    with pytest.raises(CodecError, match="invalid input"):
        encode(KVCache(keys=[x], values=[x]), "default")


def test_frames_decode_from_any_bytes_like_object() -> None:
    """bytes and read-only views (a slice of a received message) are read in place; a
    bytearray or writable view is copied before the checksum is checked."""
    kv = synthetic_kv([(96, 64), (96, 64)], seed=11)
    frame = encode(kv, "default")
    message = b"\x00" * 7 + frame + b"\x01" * 5
    want = decode(frame)
    for data in (memoryview(message)[7:7 + len(frame)], bytearray(frame),
                 memoryview(bytearray(frame))):
        got = decode(data)
        assert all(torch.equal(a, b) for a, b in zip([*got.keys, *got.values],
                                                     [*want.keys, *want.values]))
    with pytest.raises(CodecError, match="truncated"):
        decode(memoryview(message)[7:6 + len(frame)])
