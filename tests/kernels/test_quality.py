"""The quality harness: exact for a lossless copy, sane for coarse quantizers."""

from __future__ import annotations

import pytest
import torch

from kvpool.kernels import KVCache
from kvpool.kernels.baselines import PerTokenQuant
from tests.kernels.realmodel import needs_model, small_harness, small_real

pytestmark = [pytest.mark.slow, needs_model]


def test_lossless_copy_scores_one_and_zero() -> None:
    kv = small_real().kv
    copy = KVCache(keys=[k.clone() for k in kv.keys], values=[v.clone() for v in kv.values])
    q = small_harness().measure(copy)
    assert q.greedy_match == 1.0 and q.greedy_prefix == 1.0
    assert q.ppl_delta_pct == 0.0 and q.kl == 0.0
    assert q.ppl == pytest.approx(small_harness().reference_ppl)


def test_coarse_quantizers_lose_quality_in_order() -> None:
    kv, harness = small_real().kv, small_harness()
    int8 = harness.measure(PerTokenQuant(8).decode(PerTokenQuant(8).encode(kv)))
    int4 = harness.measure(PerTokenQuant(4).decode(PerTokenQuant(4).encode(kv)))
    assert int8.greedy_match >= 0.9 and abs(int8.ppl_delta_pct) < 2.0
    assert 0.0 <= int4.greedy_match <= 1.0 and 0.0 <= int4.greedy_prefix <= int4.greedy_match
    assert int4.ppl_delta_pct > int8.ppl_delta_pct
    assert 0.0 < int8.kl < int4.kl
    # no information at all: keys and values zeroed
    zero = KVCache(
        keys=[torch.zeros_like(k) for k in kv.keys], values=[torch.zeros_like(v) for v in kv.values]
    )
    blind = harness.measure(zero)
    assert blind.ppl_delta_pct > max(10.0, int4.ppl_delta_pct)
    assert blind.greedy_match < int8.greedy_match and blind.kl > 10 * int4.kl
