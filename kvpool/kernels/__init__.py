"""kvpool.kernels: the CacheGen-style KV cache codec (C++ core, CPU and CUDA paths).

Public API (docs/bitstream.md describes the frames)::

    from kvpool.kernels import (KVCache, encode, decode, peek, Profile, CodecError,
                                ProfileMismatch, LEVELS)
"""

from kvpool.kernels.codec import ChunkInfo, KVCache, decode, encode, peek
from kvpool.kernels.errors import CodecError, ProfileMismatch
from kvpool.kernels.levels import LEVELS
from kvpool.kernels.profile import Profile

__all__ = ["LEVELS", "ChunkInfo", "CodecError", "KVCache", "Profile", "ProfileMismatch", "decode",
           "encode", "peek"]
