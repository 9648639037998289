"""The sidecar's chunk codec with a model profile: one layer per chunk, that layer's tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpool.sidecar import chunks, codec
from kvpool.sidecar.proto import sidecar_pb2 as pb

if "default" not in codec.levels():
    pytest.skip("the codec's lossy levels are not built here", allow_module_level=True)

from kvpool.kernels import KVCache, Profile, peek

LAYERS, TOKENS, WIDTH = 3, 192, 128


def model_kv(seed: int) -> KVCache:
    """Rows that drift slowly, with a per-layer scale (as a model's layers differ)."""
    g = torch.Generator().manual_seed(seed)
    planes = [((torch.randn(TOKENS, WIDTH, generator=g).cumsum(0) * 0.05
                + torch.randn(TOKENS, WIDTH, generator=g)) * (1 + i)).to(torch.bfloat16)
              for i in range(2 * LAYERS)]
    return KVCache(keys=planes[0::2], values=planes[1::2])


def raw_chunk(kv: KVCache, layer: int) -> pb.RawChunk:
    return pb.RawChunk(
        key=pb.ChunkKey(layer=layer, token_start=0, token_end=TOKENS),
        dtype=chunks.dtype_name(kv.keys[layer].dtype), width=WIDTH,
        keys=chunks.to_bytes(kv.keys[layer]), values=chunks.to_bytes(kv.values[layer]))


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    path = tmp_path_factory.mktemp("profile") / "m.kvprofile"
    Profile.build([model_kv(0), model_kv(1)], model="m").save(path)
    return codec.load_profile(str(path))


def test_layer_chunks_code_with_their_slice_of_the_profile(profile):
    kv = model_kv(2)
    for layer in range(LAYERS):
        raw = raw_chunk(kv, layer)
        with_profile = codec.encode(raw, "default", LAYERS, profile)
        alone = codec.encode(raw, "default", LAYERS)
        assert peek(with_profile).profile_hash == profile.slice_hash(layer, 1)
        assert len(with_profile) < len(alone)  # no tables or statistics carried
        errors = []
        for payload, used in ((with_profile, profile), (alone, None)):
            back = codec.decode(payload, "default", used)
            keys = chunks.from_bytes(back.keys, back.dtype, back.width).float()
            errors.append(float((keys - kv.keys[layer].float()).abs().mean()))
        assert errors[0] < 1.5 * errors[1]  # the profile's ranges are the model's, not the chunk's
        with pytest.raises(codec.ChunkCodecError, match="needs profile"):
            codec.decode(with_profile, "default")


def test_a_chunk_of_a_profile_not_held_is_a_profile_mismatch(profile):
    """No profile, or another one: both decoding paths raise ProfileMismatch, whose reason
    (profile_mismatch, not the codec's generic one) a failed Load counts."""
    payload = codec.encode(raw_chunk(model_kv(2), 1), "default", LAYERS, profile)
    other = Profile.build([model_kv(5)], model="other")
    region = np.empty(peek(payload).raw_bytes, dtype=np.uint8)
    for held in (None, other):
        for decode, args in ((codec.decode, ()), (codec.decode_into, (region,))):
            with pytest.raises(codec.ProfileMismatch, match="same --profile") as err:
                decode(payload, "default", *args, held)
            assert err.value.reason == "profile_mismatch"
    with pytest.raises(codec.ChunkCodecError) as err:
        codec.decode(payload[:-1], "default", profile)
    assert err.value.reason == "codec"


def test_chunks_of_another_model_shape_carry_their_own_tables(profile):
    raw = raw_chunk(model_kv(3), 0)
    assert peek(codec.encode(raw, "default", LAYERS + 1, profile)).profile_hash is None
    assert peek(codec.encode(raw, "default", 0, profile)).profile_hash is None


def test_a_missing_or_corrupt_profile_file_is_a_clear_error(tmp_path):
    with pytest.raises(codec.ChunkCodecError, match="cannot use profile"):
        codec.load_profile(str(tmp_path / "none.kvprofile"))
    bad = tmp_path / "bad.kvprofile"
    bad.write_bytes(b"not a profile")
    with pytest.raises(codec.ChunkCodecError, match="cannot use profile"):
        codec.load_profile(str(bad))


def test_a_sidecar_with_an_unusable_profile_exits_with_a_clear_error(tmp_path):
    from kvpool.cli import main

    sock = tmp_path / "s.sock"
    code = main(["sidecar", "--local", f"unix://{sock}", "--metrics", "",
                 "--profile", str(tmp_path / "missing.kvprofile")])
    assert code == 2
