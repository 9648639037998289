"""Cutting a KV cache into token chunks and joining it again, sliding-window layers included."""

from __future__ import annotations

import pytest
import torch

from kvpool.kernels import KVCache
from kvpool.kernels.chunks import concat, split


def _kv() -> KVCache:
    g = torch.Generator().manual_seed(0)
    # layer 0 holds all 100 positions; layer 1 is a sliding-window layer holding the last 30
    # with another width.
    keys = [torch.randn(100, 8, generator=g).half(), torch.randn(30, 12, generator=g).half()]
    values = [torch.randn(100, 8, generator=g).half(), torch.randn(30, 12, generator=g).half()]
    return KVCache(keys=keys, values=values)


def test_split_then_concat_is_identity() -> None:
    kv = _kv()
    for chunk in (1, 7, 32, 100, 500):
        joined = concat(split(kv, chunk))
        for a, b in zip((*kv.keys, *kv.values), (*joined.keys, *joined.values)):
            assert torch.equal(a, b)


def test_chunks_take_positions_a_shorter_layer_holds() -> None:
    parts = split(_kv(), 32)
    assert [p.keys[0].shape[0] for p in parts] == [32, 32, 32, 4]
    # the 30-position layer covers positions 70..99
    assert [p.keys[1].shape[0] for p in parts] == [0, 0, 26, 4]
    assert parts[2].values[1].shape == (26, 12)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        split(_kv(), 0)
    with pytest.raises(ValueError):
        concat([])
