"""How much a model's output moves when one part of its KV cache is quantized coarsely.

The layers are cut into groups of consecutive layers; for each group, its keys (then its
values) are replaced by their round trip through the codec's coarsest level while every
other plane stays exact, and the model continues the prompt over the text's next tokens.
The mean KL divergence of its next-token distributions from the original ones is that
group's sensitivity, given to each of its planes. A profile built with it
(:meth:`kvpool.kernels.profile.Profile.build`) gives finer bins to the planes the model is
most sensitive to and coarser bins to the others: on SmolLM2-135M the planes differ by a
factor of 40 (the values of the first third of the layers matter most, the values of the
rest least).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kvpool.kernels import KVCache, decode, encode
from kvpool.kernels.levels import PROBE
from kvpool.kernels.realkv import RealKV, cache_from_kv

GROUPS = 6
"""Layer groups measured (2 * GROUPS forward passes over the continuation)."""


@torch.inference_mode()
def measure(real: RealKV, *, positions: int = 128, groups: int = GROUPS) -> np.ndarray:
    """Per plane (layer-major, keys before values), the sensitivity of ``real.model`` to
    coarse quantization of that plane's group: a float32 array of ``2 * layers`` KL figures.
    ``real.next_ids`` must hold at least ``positions`` tokens."""
    inputs = real.next_ids[:positions]
    if inputs.numel() < positions or positions < 1:
        raise ValueError(f"{positions} tokens after the prompt are needed, {inputs.numel()} given")
    n = len(real.kv.keys)
    coarse = decode(encode(real.kv, PROBE))

    def logp(kv: KVCache) -> torch.Tensor:
        cache = cache_from_kv(real.cache, kv)
        out = real.model.lm(inputs[None, :], past_key_values=cache, use_cache=True)
        return F.log_softmax(out.logits[0].float(), dim=-1)

    reference = logp(real.kv)
    size = -(-n // max(1, min(groups, n)))
    out = np.zeros(2 * n, np.float32)
    for first in range(0, n, size):
        span = range(first, min(first + size, n))
        for side in (0, 1):
            keys, values = list(real.kv.keys), list(real.kv.values)
            target, source = (keys, coarse.keys) if side == 0 else (values, coarse.values)
            for i in span:
                target[i] = source[i].to(real.kv.keys[i].dtype)
            got = logp(KVCache(keys=keys, values=values))
            kl = float((reference.exp() * (reference - got)).sum(-1).mean())
            for i in span:
                out[2 * i + side] = max(kl, 0.0)
    return out
