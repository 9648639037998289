"""Fixtures of the transport tests: real KV bytes of the default model, free ports."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def real_kv():
    """``(keys, values)`` of 256 tokens of real text through SmolLM2-135M (cached on disk)."""
    from kvpool.sidecar import realkv

    return realkv.prompt_kv(256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def codec_model(real_kv):
    """Per-level ratio and speed of the real codec, measured on real KV (this machine, now)."""
    from kvpool import kernels
    from kvpool.sidecar.adaptive import CodecModel

    keys, values = real_kv
    sample = kernels.KVCache(keys=list(keys), values=list(values))
    return CodecModel.calibrate(lambda kv, level: kernels.encode(kv, level=level),
                                kernels.decode, sample, kernels.LEVELS)
