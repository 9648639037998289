"""Model profiles: build, save, load, content hash; chunks that name a profile carry no
tables and decode only with it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from kvpool.kernels import CodecError, KVCache, Profile, decode, encode, peek

from .conftest import synthetic_kv


@pytest.fixture(scope="module")
def profile(profile_samples) -> Profile:
    return Profile.build(profile_samples, model="synthetic")


def test_profile_chunks_are_smaller_and_decode_the_same_way(profile, profile_samples) -> None:
    kv = synthetic_kv([(128, 96), (128, 96), (128, 64)], seed=99)
    with_profile = encode(kv, "default", profile)
    alone = encode(kv, "default")
    assert len(with_profile) < len(alone)
    assert peek(with_profile).profile_hash == profile.hash
    assert peek(alone).profile_hash is None
    out, own = decode(with_profile, profile), decode(alone)
    for a, b, c in zip(kv.keys, out.keys, own.keys):
        err = float((a.float() - b.float()).abs().mean())
        assert err < 2 * float((a.float() - c.float()).abs().mean()) + 1e-3
    print(f"profile {len(with_profile)} B, self-contained {len(alone)} B")


def test_lossless_ignores_the_profile(profile, profile_samples) -> None:
    data = encode(profile_samples[0], "lossless", profile)
    assert peek(data).profile_hash is None
    assert torch.equal(decode(data).keys[0], profile_samples[0].keys[0])


def test_save_load_keeps_the_hash(profile, tmp_path) -> None:
    path = tmp_path / "p.kvprof"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.hash == profile.hash and loaded.model == "synthetic"
    kv = synthetic_kv([(128, 96), (128, 96), (128, 64)], seed=5)
    assert encode(kv, "low", loaded) == encode(kv, "low", profile)


def test_hash_follows_content(profile_samples) -> None:
    a = Profile.build(profile_samples, model="synthetic")
    b = Profile.build(profile_samples, model="synthetic")
    c = Profile.build(profile_samples[:1], model="synthetic")
    assert a.hash == b.hash != c.hash


def test_corrupt_profile_files(profile, tmp_path) -> None:
    path = tmp_path / "p.kvprof"
    profile.save(path)
    raw = bytearray(path.read_bytes())
    for at in (0, 10, len(raw) // 2, len(raw) - 30):
        bad = bytearray(raw)
        bad[at] ^= 0x55
        (tmp_path / "bad").write_bytes(bytes(bad))
        try:
            loaded = Profile.load(tmp_path / "bad")
        except CodecError:
            continue
        assert loaded.hash == profile.hash  # a flip in zip metadata that changes nothing
    (tmp_path / "short").write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(CodecError):
        Profile.load(tmp_path / "short")
    with pytest.raises(CodecError):
        Profile.load(tmp_path / "missing")


def test_tampered_table_is_caught_by_the_hash(profile, tmp_path) -> None:
    arrays = dict(profile._arrays)
    key = next(k for k in arrays if not k.endswith((".mu", ".sigma")))
    arrays[key] = arrays[key].copy()
    arrays[key][0, 0] += 1
    path = tmp_path / "p.kvprof"
    profile.save(path)
    with np.load(path) as z:
        meta = z["meta"]
    buf = io.BytesIO()
    np.savez(buf, meta=meta, **arrays)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CodecError, match="hash"):
        Profile.load(path)


def test_profile_of_another_shape_is_refused(profile) -> None:
    kv = synthetic_kv([(10, 32)])
    with pytest.raises(CodecError, match="layers"):
        encode(kv, "default", profile)
    kv = synthetic_kv([(10, 96), (10, 96), (10, 32)])
    with pytest.raises(CodecError, match="wide"):
        encode(kv, "default", profile)


def test_build_needs_samples() -> None:
    with pytest.raises(CodecError):
        Profile.build([], model="x")
    with pytest.raises(CodecError):
        Profile.build([KVCache(keys=[np.zeros((4, 8), np.float16)],
                               values=[np.zeros((4, 8), np.float16)]),
                       KVCache(keys=[np.zeros((4, 9), np.float16)],
                               values=[np.zeros((4, 9), np.float16)])], model="x")


def test_ladder_moves_bins_one_step() -> None:
    from kvpool.kernels.levels import BIN_LADDER, shifted

    assert shifted(21, 1) == 31 and shifted(21, -1) == 15 and shifted(21, 0) == 21
    assert shifted(BIN_LADDER[0], -1) == BIN_LADDER[0]
    assert shifted(BIN_LADDER[-1], 1) == BIN_LADDER[-1]
    assert shifted(13, 1) == 13  # off the ladder: left alone


def test_sensitivity_moves_bins_to_the_planes_that_matter(profile_samples, tmp_path) -> None:
    """One ladder step per doubling of a plane's share of the error over the geometric mean
    (clipped to the reach); the bins land in the header, so decoding needs nothing more."""
    from kvpool.kernels import levels

    sens = np.array([0.5, 0.01, 0.02, 0.3, 0.001, 0.1], np.float32)  # 3 layers x (K, V)
    profile = Profile.build(profile_samples, model="synthetic", sensitivity=sens)
    # log2 shares -1, -6.6, -5.6, -1.7, -10, -3.3 around their mean -4.7
    assert profile.steps() == [3, -2, -1, 3, -3, 1]
    lv = levels.get("default")
    # under a level, shares are scaled from the probe's bins to the level's: the keys of
    # layers 1-2 (probe 9 bins, default 21) weigh (8/20)^2 of their sensitivity, so layer 1's
    # keys move two steps coarser, not one
    steps = profile.steps(lv)
    assert steps == [3, 0, -2, 3, -3, 1]
    kv = profile_samples[1]
    data = encode(kv, "default", profile)
    assert peek(data).bins == [lv.layer_bins(i, 3, (steps[2 * i], steps[2 * i + 1]))
                               for i in range(3)]
    assert peek(data).bins[0][2] == levels.shifted(peek(encode(kv, "default")).bins[0][2], 3) == 63
    out = decode(data, profile)
    assert all(o.shape == k.shape for o, k in zip(out.keys, kv.keys))
    path = tmp_path / "p.kvprofile"
    profile.save(path)
    again = Profile.load(path)
    assert again.hash == profile.hash and again.steps(lv) == steps
    assert Profile.build(profile_samples, model="synthetic").hash != profile.hash


def test_a_profile_without_sensitivity_keeps_the_level_bins(profile, profile_samples) -> None:
    kv = profile_samples[0]
    from kvpool.kernels import levels

    assert profile.steps() == profile.steps(levels.get("default")) == [0] * 6
    assert peek(encode(kv, "default", profile)).bins == peek(encode(kv, "default")).bins


def test_bad_sensitivity_is_refused(profile_samples) -> None:
    with pytest.raises(CodecError, match="sensitivity"):
        Profile.build(profile_samples, model="synthetic", sensitivity=[1.0, float("nan")] * 3)
    with pytest.raises(CodecError, match="sensitivity"):
        Profile.build(profile_samples, model="synthetic", sensitivity=[1.0] * 4)


def _slow_rows(seed: int) -> KVCache:
    """Planes whose rows move slowly against the quantizer's step (as many key channels do)."""
    g = torch.Generator().manual_seed(seed)
    planes = [(torch.randn(256, 64, generator=g).cumsum(0) * 0.3
               + torch.randn(256, 64, generator=g) * 0.2).half() for _ in range(4)]
    return KVCache(keys=planes[:2], values=planes[2:])


def test_context_tables_code_the_same_symbols_in_fewer_bytes(monkeypatch) -> None:
    """With a profile's context tables (five per channel, chosen by the symbol above) a chunk
    decodes to exactly what one table per channel gives, in fewer bytes when rows move slowly;
    a profile without them (built before they existed) codes with one table."""
    profile = Profile.build([_slow_rows(0), _slow_rows(1)], model="slow")
    kv = _slow_rows(2)
    with_contexts = encode(kv, "default", profile)
    assert peek(with_contexts).contexts
    monkeypatch.setattr(Profile, "has_contexts", lambda self, layers, first=0: False)
    one_table = encode(kv, "default", profile)
    assert not peek(one_table).contexts and not peek(encode(kv, "default")).contexts
    assert len(with_contexts) < 0.9 * len(one_table)
    a, b = decode(with_contexts, profile), decode(one_table, profile)
    assert all(torch.equal(x, y) for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]))
    print(f"context tables {len(with_contexts)} B, one table {len(one_table)} B")


def test_a_chunk_of_some_layers_names_its_slice_of_the_profile() -> None:
    """The sidecar sends one layer per chunk: such a chunk codes with that layer's tables,
    names a hash derived from the profile's and the layer, and decodes with the profile."""
    samples = [_slow_rows(0), _slow_rows(1)]
    profile = Profile.build(samples, model="slow")
    kv = _slow_rows(2)
    whole = decode(encode(kv, "default", profile), profile)
    for layer in range(2):
        one = KVCache(keys=[kv.keys[layer]], values=[kv.values[layer]])
        frame = encode(one, "default", profile, depth=(layer, 2))
        assert peek(frame).profile_hash == profile.slice_hash(layer, 1) != profile.hash
        assert profile.locate(peek(frame).profile_hash, 1) == layer
        out = decode(frame, profile)
        assert torch.equal(out.keys[0], whole.keys[layer])
        assert torch.equal(out.values[0], whole.values[layer])
    other = Profile.build(samples[:1], model="slow")
    with pytest.raises(CodecError, match="needs profile"):
        decode(frame, other)
    with pytest.raises(CodecError, match="is for 2 layers"):
        encode(KVCache(keys=[kv.keys[0]], values=[kv.values[0]]), "default", profile)


def test_compiled_tables_are_built_once_per_layout_and_bounded(profile, monkeypatch) -> None:
    """Frames of one layout (shapes, bins, contexts) share the profile's compiled tables;
    other token counts reuse them, other levels get their own, and the cache stays bounded."""
    from kvpool.kernels import _codec
    from kvpool.kernels import profile as profile_module

    shapes = [(64, 96), (64, 96), (64, 64)]
    kvs = [synthetic_kv([(tokens, w) for _, w in shapes], seed=seed)
           for seed, tokens in ((1, 64), (2, 64), (3, 100))]
    expected = [decode(encode(kv, "default", profile), profile) for kv in kvs]
    built = []
    real_compile = _codec.compile
    monkeypatch.setattr(_codec, "compile", lambda *a: built.append(a) or real_compile(*a))
    fresh = Profile("synthetic", dict(profile._arrays), profile.widths)
    for kv, want in zip(kvs, expected):
        out = decode(encode(kv, "default", fresh), fresh)
        assert all(torch.equal(a, b) for a, b in zip([*out.keys, *out.values],
                                                     [*want.keys, *want.values]))
    assert len(built) == 1
    decode(encode(synthetic_kv(shapes, seed=4), "low", fresh), fresh)
    assert len(built) == 2
    one = fresh.compiled(1, [(64, 96, 0, 0, 21, 11)] * 2 + [(64, 64, 0, 0, 21, 11)], True, 0)
    monkeypatch.setattr(profile_module, "COMPILED_CACHE_BYTES", one.nbytes)
    decode(encode(synthetic_kv(shapes, seed=5), "high", fresh), fresh)
    assert len(fresh._compiled) == 1 and fresh._compiled_bytes <= 2 * one.nbytes


def test_compiled_tables_of_another_layout_are_refused(profile) -> None:
    """The extension checks a compiled profile against the frame it decodes or encodes."""
    from kvpool.kernels import _codec

    kv = synthetic_kv([(64, 96), (64, 96), (64, 64)], seed=6)
    frame = np.frombuffer(encode(kv, "default", profile), dtype=np.uint8)
    low = encode(kv, "low", profile)
    info = _codec.parse(np.frombuffer(low, dtype=np.uint8))
    wrong = profile.compiled(info["anchor_group"], info["layers"],
                             bool(info["flags"] & 2), 0)
    outs = [torch.empty((64, w), dtype=kv.keys[0].dtype) for w in (96, 96, 96, 96, 64, 64)]
    with pytest.raises(CodecError, match="profile"):
        _codec.decode(frame, outs, wrong, 1)
