"""KV chunks: their names, their bytes, and where their tokens sit in vLLM's paged cache.

A chunk is one layer's keys and values for a run of prompt tokens, as two row-major
``[tokens, kv_heads * head_dim]`` arrays: the codec's input shape (CODEC_API.md).
Chunks are named by :func:`prefix_hash` (model + every token up to the chunk's end), like
vLLM's prefix-caching block hashes, so a chunk names the prefix it completes.

vLLM hands each attention layer's paged cache to the connector as one tensor. Two layouts
are handled (:func:`layout_for`):

* CPU attention backend: ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, and inside
  each (block, head) the keys are stored transposed (``[head_dim, block_size]``) followed
  by the values (``[block_size, head_dim]``).
* GPU flash-attention backends: the same logical shape, with keys in ``[..., :head_dim]``
  and values in ``[..., head_dim:]`` of each token's row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
"""Chunk dtypes by their wire name."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def prefix_hash(model: str, token_ids: Sequence[int], end: int) -> bytes:
    """The name of the prefix ``token_ids[:end]`` of ``model``: 16 bytes of BLAKE2b."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.encode())
    h.update(b"\0")
    h.update(np.asarray(token_ids[:end], dtype=np.int64).tobytes())
    return h.digest()


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype}; use one of {sorted(DTYPES)}") from None


def to_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a CPU tensor (any dtype, bfloat16 included)."""
    t = tensor.detach().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def from_bytes(data: bytes, dtype: str, width: int) -> torch.Tensor:
    """A ``[tokens, width]`` tensor over ``data``; ValueError when the size does not fit."""
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown chunk dtype {dtype!r}")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if width <= 0 or len(data) % (itemsize * width):
        raise ValueError(f"{len(data)} bytes are not rows of {width} {dtype} values")
    if not data:
        return torch.empty((0, width), dtype=torch_dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(torch_dtype).view(-1, width)


def token_slots(block_ids: Sequence[int], block_size: int, start: int, end: int) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """(block id, offset in block) of each token in ``[start, end)`` of a request."""
    positions = torch.arange(start, end)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long)[positions // block_size]
    return blocks, positions % block_size


@dataclass(frozen=True)
class PagedLayout:
    """How one layer's paged KV tensor ``[num_blocks, kv_heads, block_size, 2*head_dim]``
    stores a token's keys and values."""

    keys_transposed: bool
    """True for the CPU backend (keys ``[head_dim, block_size]`` per block and head)."""

    def _views(self, kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as ``[num_blocks, kv_heads, block_size, head_dim]`` views."""
        num_blocks, heads, block_size, two_d = kv_layer.shape
        head_dim = two_d // 2
        if not self.keys_transposed:
            return kv_layer[..., :head_dim], kv_layer[..., head_dim:]
        flat = kv_layer.view(num_blocks, heads, 2, head_dim * block_size)
        keys = flat[:, :, 0].view(num_blocks, heads, head_dim, block_size).transpose(2, 3)
        values = flat[:, :, 1].view(num_blocks, heads, block_size, head_dim)
        return keys, values

    def gather(
        self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given token slots as ``[tokens, kv_heads*head_dim]`` CPU
        tensors (copies)."""
        keys, values = self._views(kv_layer)
        blocks = blocks.to(kv_layer.device)
        offsets = offsets.to(kv_layer.device)
        # Advanced indexing on dims 0 and 2 puts the token dim first: [tokens, heads, head_dim].
        k = keys[blocks, :, offsets].reshape(len(blocks), -1)
        v = values[blocks, :, offsets].reshape(len(blocks), -1)
        return k.cpu(), v.cpu()

    def scatter(
        self,
        kv_layer: torch.Tensor,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Write ``[tokens, kv_heads*head_dim]`` keys and values into the given slots."""
        keys, values = self._views(kv_layer)
        heads, head_dim = keys.shape[1], keys.shape[3]
        device = kv_layer.device
        blocks = blocks.to(device)
        offsets = offsets.to(device)
        keys[blocks, :, offsets] = k.to(device, kv_layer.dtype).view(-1, heads, head_dim)
        values[blocks, :, offsets] = v.to(device, kv_layer.dtype).view(-1, heads, head_dim)


CPU_LAYOUT = PagedLayout(keys_transposed=True)
FLASH_LAYOUT = PagedLayout(keys_transposed=False)


def layout_for(kv_layer: torch.Tensor) -> PagedLayout:
    """The layout of a layer's paged KV tensor: the CPU backend's on CPU, else flash's."""
    if kv_layer.dim() != 4 or kv_layer.shape[-1] % 2:
        raise ValueError(
            "expected a paged KV tensor [num_blocks, kv_heads, block_size, 2*head_dim], "
            f"got shape {tuple(kv_layer.shape)}"
        )
    return CPU_LAYOUT if kv_layer.device.type == "cpu" else FLASH_LAYOUT
