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
from kvpool.kernels import realkv as kernels_realkv


def prompt(tokens: int):
    """The :class:`kvpool.kernels.realkv.RealKV` of the first ``tokens`` tokens of real text
    (model, prompt ids, continuation), computed afresh: for quality measurements."""
    return kernels_realkv.extract(_model(), tokens=tokens, next_tokens=257)


@functools.cache
def _model():
    return kernels_realkv.load_model()


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
    model = _model()
    kv, _ = kernels_realkv.kv_of(model, kernels_realkv.text_ids(model.tokenizer, tokens), dtype)
    keys, values = tuple(kv.keys), tuple(kv.values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({**{f"k{i}": k for i, k in enumerate(keys)},
               **{f"v{i}": v for i, v in enumerate(values)}}, tmp)
    tmp.rename(path)
    return keys, values


def raw_bytes(keys, values) -> bytes:
    """Per layer the keys then the values, back to back: what the ``raw`` codec sends."""
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                    for pair in zip(keys, values) for t in pair)
