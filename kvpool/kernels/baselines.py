"""The baselines the codec is measured against, on the same KV and with the same metrics.

- ``int8`` / ``int4``: per-token asymmetric quantization (one fp16 scale and one fp16 minimum
  per token row of each layer's K and V, 8 or 4 bits per value, two 4-bit values per byte);
- ``zstd3``: zstd level 3 (the ``zstandard`` library) on the fp16 bytes, lossless.

Each baseline turns a :class:`~kvpool.kernels.KVCache` into an :class:`Encoded` payload and
back; ``len(encoded)`` is the number of bytes that would travel (the layer shapes are the
caller's to know, as the codec's header would carry them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from kvpool.kernels import KVCache

__all__ = ["BASELINES", "Baseline", "Encoded", "PerTokenQuant", "Zstd"]


@dataclass(frozen=True)
class Encoded:
    """A baseline's output: the payload and the per-tensor shapes needed to decode it."""

    parts: tuple[bytes, ...]
    shapes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


def _tensors(kv: KVCache) -> list[torch.Tensor]:
    return [torch.as_tensor(t) for t in (*kv.keys, *kv.values)]


def _to_kv(tensors: list[torch.Tensor]) -> KVCache:
    half = len(tensors) // 2
    return KVCache(keys=tensors[:half], values=tensors[half:])


class Baseline(ABC):
    """A codec to compare with: a name, ``encode(kv) -> Encoded`` and ``decode(Encoded) -> kv``."""

    name: str

    def encode(self, kv: KVCache) -> Encoded:
        tensors = _tensors(kv)
        return Encoded(
            tuple(self._encode(t) for t in tensors),
            tuple((t.shape[0], t.shape[1]) for t in tensors),
        )

    def decode(self, enc: Encoded) -> KVCache:
        return _to_kv([self._decode(p, shape) for p, shape in zip(enc.parts, enc.shapes)])

    @abstractmethod
    def _encode(self, t: torch.Tensor) -> bytes:
        """One ``[tokens, width]`` tensor to bytes."""

    @abstractmethod
    def _decode(self, data: bytes, shape: tuple[int, int]) -> torch.Tensor:
        """The inverse of :meth:`_encode`: an fp16 tensor of ``shape``."""


class PerTokenQuant(Baseline):
    """Per-token asymmetric ``bits``-bit quantization (8 or 4) with fp16 scale and minimum."""

    def __init__(self, bits: int) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.bits = bits
        self.name = f"int{bits}"

    def _encode(self, t: torch.Tensor) -> bytes:
        x = t.float()
        lo = x.amin(dim=1, keepdim=True).half().float()
        scale = ((x.amax(dim=1, keepdim=True) - lo) / (2**self.bits - 1)).half().float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((x - lo) / safe).clamp_(0, 2**self.bits - 1).to(torch.uint8)
        if self.bits == 4:
            if q.shape[1] % 2:
                q = torch.nn.functional.pad(q, (0, 1))
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        meta = torch.cat([scale, lo], dim=1).half()
        return meta.numpy().tobytes() + q.contiguous().numpy().tobytes()

    def _decode(self, data: bytes, shape: tuple[int, int]) -> torch.Tensor:
        rows, width = shape
        meta_bytes = rows * 2 * 2
        meta = torch.from_numpy(np.frombuffer(data, np.float16, rows * 2).copy()).float()
        q = torch.from_numpy(np.frombuffer(data, np.uint8, offset=meta_bytes).copy())
        if self.bits == 4:
            q = q.reshape(rows, -1)
            q = torch.stack([q & 0x0F, q >> 4], dim=2).reshape(rows, -1)[:, :width]
        q = q.reshape(rows, width).float()
        meta = meta.reshape(rows, 2)
        return (q * meta[:, :1] + meta[:, 1:]).half()


class Zstd(Baseline):
    """zstd at ``level`` on the fp16 bytes: lossless."""

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self.name = f"zstd{level}"
        self._c = zstandard.ZstdCompressor(level=level)
        self._d = zstandard.ZstdDecompressor()

    def _encode(self, t: torch.Tensor) -> bytes:
        return self._c.compress(t.half().contiguous().numpy().tobytes())

    def _decode(self, data: bytes, shape: tuple[int, int]) -> torch.Tensor:
        raw = self._d.decompress(data, max_output_size=shape[0] * shape[1] * 2)
        return torch.from_numpy(np.frombuffer(raw, np.float16).copy()).reshape(shape)


BASELINES: tuple[Baseline, ...] = (PerTokenQuant(8), PerTokenQuant(4), Zstd(3))
