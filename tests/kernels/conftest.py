"""Fixtures of the codec tests: small synthetic KV caches shaped like real ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpool.kernels import KVCache


def synthetic_kv(
    layers: list[tuple[int, int]], dtype: torch.dtype = torch.float16, seed: int = 0
) -> KVCache:
    """Keys with per-channel offsets and a few outlier channels (as real keys have), values
    near zero; rows drift slowly so that neighbouring tokens are alike. The offsets belong to
    the "model" (the same for every seed), the rest to the sample."""
    g = torch.Generator().manual_seed(seed)
    model = torch.Generator().manual_seed(1234)
    keys, values = [], []
    for tokens, width in layers:
        offset = torch.randn(width, generator=model) * 2
        offset[:: max(width // 8, 1)] *= 8
        drift = torch.randn(tokens, width, generator=g).cumsum(0) * 0.05
        keys.append((offset + drift + torch.randn(tokens, width, generator=g)).to(dtype))
        values.append((torch.randn(tokens, width, generator=g) * 0.3).to(dtype))
    return KVCache(keys=keys, values=values)


@pytest.fixture
def small_kv() -> KVCache:
    return synthetic_kv([(100, 96), (100, 96), (37, 64)])


@pytest.fixture(scope="session")
def profile_samples() -> list[KVCache]:
    return [synthetic_kv([(128, 96), (128, 96), (128, 64)], seed=s) for s in range(3)]


def as_numpy(x) -> np.ndarray:
    t = torch.as_tensor(x)
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def frame_with_bad_table() -> bytes:
    """A sealed `default` frame (one plane pair, its own tables) whose first table has a
    zero frequency: only building the tables can tell (the checksum is right)."""
    import google_crc32c

    from kvpool.kernels import _codec, encode

    frame = bytearray(encode(synthetic_kv([(128, 64)], seed=3), "default", position=100)[:-4])
    h = _codec.parse(np.frombuffer(bytes(frame), dtype=np.uint8))
    width = h["layers"][0][1]
    first = h["header_size"] + 4 * width  # after the first plane's channel mu and sigma (bf16)
    frame[first:first + 2] = b"\x00\x00"
    return bytes(frame) + google_crc32c.value(bytes(frame)).to_bytes(4, "little")
