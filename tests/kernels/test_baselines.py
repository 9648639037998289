"""The baselines: per-token int8/int4 quantization and zstd level 3 round trips."""

from __future__ import annotations

import pytest
import torch

from kvpool.kernels import KVCache
from kvpool.kernels.baselines import BASELINES, PerTokenQuant, Zstd


def _kv(width: int = 192, tokens: int = 64) -> KVCache:
    g = torch.Generator().manual_seed(1)
    make = lambda scale: (torch.randn(tokens, width, generator=g) * scale).half()
    return KVCache(
        keys=[make(3.0), make(0.5)], values=[make(1.0), torch.zeros(tokens, width).half()]
    )


def _tensors(kv: KVCache) -> list[torch.Tensor]:
    return [*kv.keys, *kv.values]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [192, 33])
def test_per_token_quant_error_is_within_half_a_step(bits: int, width: int) -> None:
    kv = _kv(width)
    q = PerTokenQuant(bits)
    enc = q.encode(kv)
    tokens = kv.keys[0].shape[0]
    per_row = 4 + (width * bits + 7) // 8
    assert len(enc) == 4 * tokens * per_row
    for a, b in zip(_tensors(kv), _tensors(q.decode(enc))):
        assert b.dtype == torch.float16 and b.shape == a.shape
        step = (a.float().amax(1) - a.float().amin(1)) / (2**bits - 1)
        err = (a.float() - b.float()).abs().amax(1)
        # half a step, plus fp16 rounding of scale, minimum and result
        assert torch.all(err <= 0.5 * step + 2e-3 * a.float().abs().amax(1) + 1e-3)


def test_zstd_is_bit_exact_and_compresses_redundant_data() -> None:
    kv = _kv()
    z = Zstd(3)
    enc = z.encode(kv)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(kv), _tensors(z.decode(enc))))
    raw = sum(t.numel() * 2 for t in _tensors(kv))
    assert len(enc) < raw  # the all-zero layer compresses to almost nothing


def test_registry() -> None:
    assert [b.name for b in BASELINES] == ["int8", "int4", "zstd3"]
    with pytest.raises(ValueError):
        PerTokenQuant(3)
