"""Cut a KV cache into chunks of consecutive token positions, and join them again.

A KV cache covers the prompt positions ``[0, tokens)``. A layer that keeps fewer tokens
(a sliding-window layer) holds the last ``tokens_i`` positions; a chunk ``[start, end)``
takes from it only the positions it holds, possibly none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpool.kernels import KVCache

__all__ = ["concat", "split"]


def split(kv: KVCache, chunk_tokens: int) -> list[KVCache]:
    """``kv`` cut into chunks of ``chunk_tokens`` positions (the last one may be shorter)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, not {chunk_tokens}")
    tensors = [torch.as_tensor(t) for t in (*kv.keys, *kv.values)]
    total = max(t.shape[0] for t in tensors)
    chunks = []
    for start in range(0, total, chunk_tokens):
        end = min(start + chunk_tokens, total)
        parts = []
        for t in tensors:
            first = total - t.shape[0]  # position of the layer's first row
            parts.append(t[max(start, first) - first : max(end, first) - first])
        half = len(parts) // 2
        chunks.append(KVCache(keys=parts[:half], values=parts[half:]))
    return chunks


def concat(chunks: Sequence[KVCache]) -> KVCache:
    """The inverse of :func:`split`: layer by layer, the chunks' rows in order."""
    if not chunks:
        raise ValueError("no chunks to join")
    layers = len(chunks[0].keys)

    def join(side: str, i: int) -> torch.Tensor:
        return torch.cat([torch.as_tensor(getattr(c, side)[i]).cpu() for c in chunks])

    return KVCache(
        keys=[join("keys", i) for i in range(layers)],
        values=[join("values", i) for i in range(layers)],
    )
