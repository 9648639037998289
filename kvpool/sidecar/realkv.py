"""Real KV caches of the default model (SmolLM2-135M) for transfer benchmarks and tests.

Runs the prompt through transformers on the CPU once per (tokens, dtype), keeps the result
in the kvpool cache folder (safetensors; a 4k-token forward pass takes tens of seconds on a
busy 2-core machine) and returns per-layer keys and values shaped ``[tokens, kv_heads * head_dim]``, the
codec's input layout (wrap them in ``kvpool.kernels.KVCache(keys, values)``).
"""

from __future__ import annotations

import functools
import os

import torch

from kvpool import models


@functools.cache
def _model():
    return models.load_causal_lm()


@functools.cache
def prompt_kv(tokens: int, dtype: torch.dtype = torch.float16
              ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``(keys, values)``: per layer, the KV of the first ``tokens`` tokens of real text."""
    from safetensors.torch import load_file, save_file

    path = models.cache_dir() / "kv" / f"{models.model_dir().name}-{tokens}-{str(dtype)[6:]}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        n = len(tensors) // 2
        return (tuple(tensors[f"k{i}"] for i in range(n)), tuple(tensors[f"v{i}"] for i in range(n)))
    keys, values = _compute(tokens, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({**{f"k{i}": k for i, k in enumerate(keys)},
               **{f"v{i}": v for i, v in enumerate(values)}}, tmp)
    tmp.rename(path)
    return keys, values


def _compute(tokens: int, dtype: torch.dtype):
    lm, tokenizer = _model()
    text = models.sample_text(min_chars=tokens * 8)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the sample text has only {ids.shape[1]} tokens, {tokens} asked")
    with torch.inference_mode():
        cache = lm(ids, use_cache=True).past_key_values
    keys, values = [], []
    for layer in range(len(cache.layers) if hasattr(cache, "layers") else len(cache)):
        k, v = _layer_kv(cache, layer)
        # [1, kv_heads, tokens, head_dim] -> [tokens, kv_heads * head_dim]
        keys.append(k[0].transpose(0, 1).reshape(tokens, -1).to(dtype).contiguous())
        values.append(v[0].transpose(0, 1).reshape(tokens, -1).to(dtype).contiguous())
    return tuple(keys), tuple(values)


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]


def raw_bytes(keys, values) -> bytes:
    """Per layer the keys then the values, back to back: what the ``raw`` codec sends."""
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                    for pair in zip(keys, values) for t in pair)
