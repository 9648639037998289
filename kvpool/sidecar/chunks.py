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

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}
"""An integer dtype of each element size: numpy's view of a chunk's values."""


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


def planes(region: np.ndarray, dtype: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[tokens, width]`` over the bytes of one chunk laid out keys first
    (a uint8 array, e.g. over a shared-memory mapping): views, no copy."""
    both = torch.from_numpy(region).view(DTYPES[dtype]).view(2, -1, width)
    return both[0], both[1]


def token_slots(block_ids: Sequence[int], block_size: int, start: int, end: int) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """(block id, offset in block) of each token in ``[start, end)`` of a request.

    Computed with numpy: torch's small integer ops wait on its intra-op threads, which on a
    busy CPU (the forward pass) costs milliseconds per call."""
    positions = np.arange(start, end, dtype=np.int64)
    blocks = np.asarray(block_ids, dtype=np.int64)[positions // block_size]
    return torch.from_numpy(blocks), torch.from_numpy(positions % block_size)


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

    def _to_blocks(self, k: torch.Tensor, v: torch.Tensor, heads: int, block_size: int
                   ) -> torch.Tensor:
        """Rows ``[n * block_size, heads*head_dim]`` of keys and values as the contents of
        ``n`` whole blocks, ``[n, heads, block_size, 2*head_dim]`` in this layout.

        The permuted copies go through numpy on the CPU: torch's strided copy of 2-byte
        dtypes is some 30x slower there (and worse on a busy machine)."""
        n = k.shape[0] // block_size
        dtype = k.dtype
        if k.device.type == "cpu":
            same_size = _INT_OF_SIZE[k.element_size()]
            kn = k.contiguous().view(same_size).numpy().reshape(n, block_size, heads, -1)
            vn = v.contiguous().view(same_size).numpy().reshape(n, block_size, heads, -1)
            vn = vn.transpose(0, 2, 1, 3)  # [n, heads, block, head_dim]
            if self.keys_transposed:
                kn = kn.transpose(0, 2, 3, 1)  # [n, heads, head_dim, block]
                out = np.concatenate((np.ascontiguousarray(kn).reshape(n, heads, -1),
                                      np.ascontiguousarray(vn).reshape(n, heads, -1)), axis=2)
            else:
                out = np.concatenate((kn.transpose(0, 2, 1, 3), vn), axis=3)
            return torch.from_numpy(out).view(dtype).view(n, heads, block_size, -1)
        k = k.view(n, block_size, heads, -1).transpose(1, 2)  # [n, heads, block, head_dim]
        v = v.view(n, block_size, heads, -1).transpose(1, 2)
        if self.keys_transposed:
            k = k.transpose(2, 3)  # [n, heads, head_dim, block]
            return torch.cat((k.reshape(n, heads, -1), v.reshape(n, heads, -1)), dim=2
                             ).view(n, heads, block_size, -1)
        return torch.cat((k, v), dim=3)

    def _from_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`_to_blocks`: rows ``[n * block_size, heads*head_dim]``."""
        n, heads, block_size, two_d = blocks.shape
        head_dim = two_d // 2
        if self.keys_transposed:
            flat = blocks.view(n, heads, 2, head_dim * block_size)
            k = flat[:, :, 0].view(n, heads, head_dim, block_size).transpose(2, 3)
            v = flat[:, :, 1].view(n, heads, block_size, head_dim)
        else:
            k, v = blocks[..., :head_dim], blocks[..., head_dim:]
        rows = n * block_size
        return (k.transpose(1, 2).reshape(rows, heads * head_dim),
                v.transpose(1, 2).reshape(rows, heads * head_dim))

    @staticmethod
    def _whole_blocks(blocks: torch.Tensor, offsets: torch.Tensor, block_size: int
                      ) -> tuple[int, int]:
        """``(lead, n)``: slots ``[lead, lead + n*block_size)`` fill ``n`` whole blocks, each
        in order (0 blocks when the slots are not consecutive tokens, as from
        :func:`token_slots`)."""
        tokens = len(offsets)
        if not tokens:
            return 0, 0
        lead = min(tokens, (block_size - int(offsets[0])) % block_size)
        n = (tokens - lead) // block_size
        if n:
            span = slice(lead, lead + n * block_size)
            rows_offsets = offsets[span].view(n, block_size)
            rows_blocks = blocks[span].view(n, block_size)
            if not (torch.equal(rows_offsets, torch.arange(block_size).expand(n, block_size))
                    and torch.equal(rows_blocks, rows_blocks[:, :1].expand(n, block_size))):
                return 0, 0
        return lead, n

    def gather(
        self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given token slots as ``[tokens, kv_heads*head_dim]`` CPU
        tensors (copies). Whole blocks are copied as blocks, the rest token by token."""
        block_size = kv_layer.shape[2]
        lead, n = self._whole_blocks(blocks, offsets, block_size)
        if not n:
            return self._gather_slots(kv_layer, blocks, offsets)
        tail = lead + n * block_size
        whole = kv_layer[blocks[lead:tail:block_size].to(kv_layer.device)]
        parts = [tuple(t.cpu() for t in self._from_blocks(whole))]
        if lead:
            parts.insert(0, self._gather_slots(kv_layer, blocks[:lead], offsets[:lead]))
        if tail < len(offsets):
            parts.append(self._gather_slots(kv_layer, blocks[tail:], offsets[tail:]))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _gather_slots(
        self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        """Write ``[tokens, kv_heads*head_dim]`` keys and values into the given slots
        (whole blocks as blocks, the rest token by token)."""
        block_size, heads = kv_layer.shape[2], kv_layer.shape[1]
        lead, n = self._whole_blocks(blocks, offsets, block_size)
        if not n:
            self._scatter_slots(kv_layer, blocks, offsets, k, v)
            return
        tail = lead + n * block_size
        device = kv_layer.device
        whole = self._to_blocks(k[lead:tail].to(kv_layer.dtype),
                                v[lead:tail].to(kv_layer.dtype), heads, block_size)
        ids = blocks[lead:tail:block_size]
        if device.type == "cpu":
            # numpy's fancy assignment: torch's index_put of 2-byte dtypes on the CPU is
            # 10-20x slower, and it competes for the intra-op threads of the forward pass.
            same_size = _INT_OF_SIZE[kv_layer.element_size()]
            kv_layer.view(same_size).numpy()[ids.numpy()] = whole.view(same_size).numpy()
        else:
            kv_layer[ids.to(device)] = whole.to(device)
        for span in (slice(0, lead), slice(tail, None)):
            if len(offsets[span]):
                self._scatter_slots(kv_layer, blocks[span], offsets[span], k[span], v[span])

    def _scatter_slots(
        self,
        kv_layer: torch.Tensor,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
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
