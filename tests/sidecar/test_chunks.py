"""Chunk names and the paged-cache layouts (CPU attention backend and flash attention)."""

from __future__ import annotations

import pytest
import torch

from kvpool.sidecar import chunks

BLOCKS, HEADS, BLOCK, DIM = 6, 3, 32, 64


def test_prefix_hash_names_the_model_and_every_token_up_to_the_end():
    tokens = list(range(100))
    h = chunks.prefix_hash("m", tokens, 64)
    assert h == chunks.prefix_hash("m", tokens[:64] + [7] * 36, 64)
    assert h != chunks.prefix_hash("m", tokens, 63)
    assert h != chunks.prefix_hash("other", tokens, 64)
    assert h != chunks.prefix_hash("m", [1] + tokens[1:], 64)


def test_cpu_layout_reads_keys_transposed_then_values():
    kv = torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM)
    flat = kv.view(BLOCKS, HEADS, -1)
    blocks, offsets = chunks.token_slots([4, 1], BLOCK, 30, 34)  # crosses a block
    k, v = chunks.CPU_LAYOUT.gather(kv, blocks, offsets)
    assert k.shape == v.shape == (4, HEADS * DIM)
    # token 30 lies in block 4 at offset 30; token 33 in block 1 at offset 1
    assert k[0, 5] == flat[4, 0, 5 * BLOCK + 30]
    assert k[3, DIM + 7] == flat[1, 1, 7 * BLOCK + 1]
    assert v[3, 2 * DIM + 9] == flat[1, 2, DIM * BLOCK + 1 * DIM + 9]


def test_flash_layout_reads_keys_then_values_of_each_token_row():
    kv = torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM)
    blocks, offsets = chunks.token_slots([2, 5], BLOCK, 0, 40)
    k, v = chunks.FLASH_LAYOUT.gather(kv, blocks, offsets)
    assert torch.equal(k[35].view(HEADS, DIM), kv[5, :, 3, :DIM])
    assert torch.equal(v[35].view(HEADS, DIM), kv[5, :, 3, DIM:])


@pytest.mark.parametrize("layout", [chunks.CPU_LAYOUT, chunks.FLASH_LAYOUT])
def test_scatter_writes_only_the_given_tokens(layout):
    src = torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM).to(torch.bfloat16)
    slots = chunks.token_slots([3, 0, 5], BLOCK, 20, 70)
    k, v = layout.gather(src, *slots)
    dst = torch.zeros_like(src)
    layout.scatter(dst, *slots, k, v)
    assert torch.equal(torch.stack(layout.gather(dst, *slots)), torch.stack((k, v)))
    untouched = chunks.token_slots([3, 0, 5], BLOCK, 0, 20)
    assert not torch.stack(layout.gather(dst, *untouched)).any()


def test_bytes_round_trip_and_bad_sizes():
    t = torch.randn(7, 192).to(torch.bfloat16)
    assert torch.equal(chunks.from_bytes(chunks.to_bytes(t), "bfloat16", 192), t)
    with pytest.raises(ValueError, match="not rows of 192"):
        chunks.from_bytes(b"\0" * 10, "bfloat16", 192)
    with pytest.raises(ValueError, match="unknown chunk dtype"):
        chunks.from_bytes(b"", "int4", 192)


@pytest.mark.gpu
def test_layout_on_cuda_is_flash_and_round_trips():
    kv = torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM, device="cuda", dtype=torch.float16)
    layout = chunks.layout_for(kv)
    assert layout is chunks.FLASH_LAYOUT
    slots = chunks.token_slots([1, 4], BLOCK, 10, 50)
    k, v = layout.gather(kv, *slots)
    assert k.device.type == "cpu"
    dst = torch.zeros_like(kv)
    layout.scatter(dst, *slots, k, v)
    assert torch.equal(dst[4, :, :18], kv[4, :, :18]) and torch.equal(dst[1, :, 10:], kv[1, :, 10:])


@pytest.mark.parametrize("layout", [chunks.CPU_LAYOUT, chunks.FLASH_LAYOUT])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("span", [(0, 64), (5, 70), (32, 192), (31, 33), (0, 7), (40, 160)])
def test_whole_blocks_move_as_blocks_like_token_by_token(layout, dtype, span):
    """Whole blocks are gathered and scattered as blocks, the ends token by token: the
    same tensors and cache as moving every token on its own."""
    start, end = span
    block_ids = [4, 0, 5, 2, 1, 3][: (end + BLOCK - 1) // BLOCK]
    slots = chunks.token_slots(block_ids, BLOCK, start, end)
    src = torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM).to(dtype)
    k, v = layout.gather(src, *slots)
    token_k, token_v = layout._gather_slots(src, *slots)
    assert torch.equal(k, token_k) and torch.equal(v, token_v)
    dst, token_dst = torch.zeros_like(src), torch.zeros_like(src)
    layout.scatter(dst, *slots, k, v)
    layout._scatter_slots(token_dst, *slots, k, v)
    assert torch.equal(dst, token_dst)
