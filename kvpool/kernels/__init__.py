"""kvpool.kernels: the CacheGen-style KV cache codec (C++ core, CPU and CUDA paths)."""

from dataclasses import dataclass


@dataclass
class KVCache:
    """Per-layer keys and values of a run of tokens: ``keys[i]``, ``values[i]`` are
    ``[tokens_i, kv_heads * head_dim]`` tensors or arrays of layer ``i``."""

    keys: list
    values: list
