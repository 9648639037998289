"""The CUDA path: same bytes as the CPU path, same decoded values; a clean error without a
GPU. GPU tests skip themselves where no CUDA device is present (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from kvpool.kernels import CodecError, Profile, decode, encode, peek
from tests.conftest import cuda_available

from .conftest import frame_with_bad_table, synthetic_kv

CASES = [(level, dtype) for level in ("lossless", "default", "lowest")
         for dtype in (torch.float16, torch.bfloat16, torch.float32)]


def test_cuda_module_is_built_where_nvcc_is() -> None:
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("no CUDA compiler on this machine")
    assert importlib.util.find_spec("kvpool.kernels._codec_cuda") is not None
    from kvpool.kernels import _codec_cuda

    assert _codec_cuda.device_count() >= 0


def test_cuda_module_takes_the_cpu_modules_compiled_profiles(profile_samples) -> None:
    """Both extension modules share the bound CompiledProfile type: the CUDA path gets the
    profile's compiled tables (and keeps its device copy with them)."""
    if importlib.util.find_spec("kvpool.kernels._codec_cuda") is None:
        pytest.skip("the CUDA module is not built here")
    if cuda_available():
        pytest.skip("a CUDA device is present (the GPU tests decode with profiles)")
    import numpy as np

    from kvpool.kernels import _codec_cuda

    profile = Profile.build(profile_samples, model="synthetic")
    frame = encode(profile_samples[0], "default", profile)
    info = peek(frame)
    layers = [(t, w, *b) for (t, w), b in zip(info.layers, info.bins)]
    compiled = profile.compiled(1, layers, info.contexts, 0)
    with pytest.raises(CodecError, match="no CUDA device"):  # not a TypeError
        _codec_cuda.decode(np.frombuffer(frame, dtype=np.uint8), [], compiled)


def test_no_device_is_a_clean_error() -> None:
    if cuda_available():
        pytest.skip("a CUDA device is present")
    data = encode(synthetic_kv([(8, 8)]), "default")
    with pytest.raises(CodecError, match="CUDA"):
        decode(data, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("level,dtype", CASES, ids=str)
def test_gpu_bitstream_and_decode_match_cpu(level: str, dtype: torch.dtype) -> None:
    kv = synthetic_kv([(300, 128), (77, 128), (1, 64), (0, 32)], dtype)
    cpu = encode(kv, level)
    on_gpu = type(kv)(keys=[k.cuda() for k in kv.keys], values=[v.cuda() for v in kv.values])
    assert encode(on_gpu, level) == cpu
    a, b = decode(cpu), decode(cpu, device="cuda")
    for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]):
        assert y.is_cuda and y.dtype == dtype
        assert torch.equal(x, y.cpu())


@pytest.mark.gpu
def test_gpu_profile_chunks_match_cpu(profile_samples) -> None:
    profile = Profile.build(profile_samples, model="synthetic")
    kv = profile_samples[1]
    cpu = encode(kv, "default", profile)
    assert peek(cpu).contexts  # the profile's context tables, on both paths
    on_gpu = type(kv)(keys=[k.cuda() for k in kv.keys], values=[v.cuda() for v in kv.values])
    assert encode(on_gpu, "default", profile) == cpu
    a, b = decode(cpu, profile), decode(cpu, profile, device="cuda")
    assert all(torch.equal(x, y.cpu()) for x, y in zip(a.keys, b.keys))


@pytest.mark.gpu
def test_gpu_rejects_corrupt_streams() -> None:
    import google_crc32c

    body = bytearray(encode(synthetic_kv([(128, 64)]), "default")[:-4])
    body[-3] ^= 0xFF  # inside the last stream
    sealed = bytes(body) + google_crc32c.value(bytes(body)).to_bytes(4, "little")
    with pytest.raises(CodecError):
        decode(sealed, device="cuda")


@pytest.mark.gpu
def test_gpu_rejects_a_frame_whose_tables_are_corrupt() -> None:
    """The device builds and checks the frame's own tables."""
    with pytest.raises(CodecError, match="tables"):
        decode(frame_with_bad_table(), device="cuda")
