"""kvpool.kernels: the CacheGen-style KV cache codec (C++ core, CPU and CUDA paths)."""
