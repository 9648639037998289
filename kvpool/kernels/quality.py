"""What a lossy KV cache does to the model: greedy agreement and perplexity.

A :class:`QualityHarness` holds a real prompt's original KV cache (from
:mod:`kvpool.kernels.realkv`) and measures a decoded copy of it against the original:

- ``greedy_match``: the model continues the prompt greedily for 64 tokens from the original
  KV; the same 64 steps are then taken from the decoded KV, each fed the same preceding
  tokens, and this is the fraction of steps that pick the same token. (Feeding the same
  tokens keeps one early flip from counting against every later step; ``greedy_prefix``
  is the fraction of steps before the first flip, i.e. what free-running generation from
  the decoded KV would reproduce exactly.)
- ``ppl_delta_pct``: the perplexity of the text's next 256 tokens conditioned on the
  decoded KV, relative to the original, in percent.
- ``kl``: the mean KL divergence (nats) from the original next-token distributions to the
  decoded ones over the same 256 positions: a smoother figure than the perplexity of one
  text, which moves by a few percent either way when a handful of tokens change rank.

Both continue from the cache exactly as a decode worker would: the first continuation
token is fed as input, at the position after the prompt; the keys in the cache are
post-RoPE, so nothing is re-rotated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpool.kernels import KVCache
from kvpool.kernels.realkv import RealKV, cache_from_kv

__all__ = ["Quality", "QualityHarness"]


@dataclass(frozen=True)
class Quality:
    greedy_match: float
    greedy_prefix: float
    ppl: float
    ppl_delta_pct: float
    kl: float


class QualityHarness:
    """Measures decoded KV caches of one prompt against its original KV cache."""

    def __init__(self, real: RealKV, *, greedy_tokens: int = 64, ppl_tokens: int = 256) -> None:
        if real.next_ids.numel() < max(ppl_tokens + 1, 1):
            raise ValueError(
                f"{ppl_tokens + 1} tokens after the prompt are needed, {real.next_ids.numel()} given"
            )
        self.real = real
        self.ppl_tokens = ppl_tokens
        self.greedy_tokens = greedy_tokens
        with torch.inference_mode():
            first = real.next_ids[:1]
            generated = self._generate(real.kv, first, greedy_tokens)
            # The greedy path fed back as input: step i sees the first token and steps < i.
            self._greedy_inputs = torch.cat([first, generated[:-1]])
            self._reference_tokens = self._argmax_path(real.kv)
            self._reference_logp = self._logp(real.kv)
            self._reference_nll = self._nll(self._reference_logp)

    @property
    def reference_ppl(self) -> float:
        return math.exp(self._reference_nll)

    def measure(self, kv: KVCache) -> Quality:
        with torch.inference_mode():
            tokens = self._argmax_path(kv)
            logp = self._logp(kv)
            nll = self._nll(logp)
            ref = self._reference_logp
            kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
        same = tokens == self._reference_tokens
        flips = torch.nonzero(~same)
        first_flip = int(flips[0]) if flips.numel() else same.numel()
        return Quality(
            greedy_match=float(same.float().mean()),
            greedy_prefix=first_flip / same.numel(),
            ppl=math.exp(nll),
            ppl_delta_pct=100.0 * math.expm1(nll - self._reference_nll),
            kl=max(kl, 0.0),
        )

    def _logits(self, kv: KVCache, inputs: torch.Tensor) -> torch.Tensor:
        cache = cache_from_kv(self.real.cache, kv)
        out = self.real.model.lm(inputs[None, :], past_key_values=cache, use_cache=True)
        return out.logits[0].float()

    def _generate(self, kv: KVCache, first: torch.Tensor, count: int) -> torch.Tensor:
        cache = cache_from_kv(self.real.cache, kv)
        token, out = first, []
        for _ in range(count):
            logits = self.real.model.lm(
                token[None, :], past_key_values=cache, use_cache=True
            ).logits
            token = logits[0, -1:].argmax(-1)
            out.append(token)
        return torch.cat(out)

    def _argmax_path(self, kv: KVCache) -> torch.Tensor:
        return self._logits(kv, self._greedy_inputs).argmax(-1)

    def _logp(self, kv: KVCache) -> torch.Tensor:
        """Next-token log-probabilities at each of the text's next ``ppl_tokens`` positions."""
        return F.log_softmax(self._logits(kv, self.real.next_ids[: self.ppl_tokens]), dim=-1)

    def _nll(self, logp: torch.Tensor) -> float:
        targets = self.real.next_ids[1 : self.ppl_tokens + 1]
        return float(F.nll_loss(logp, targets))
