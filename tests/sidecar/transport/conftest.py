"""Fixtures of the transport tests: real KV bytes of the default model, free ports, pairs
of sidecars in this process."""

from __future__ import annotations

import socket

import grpc
import pytest
import pytest_asyncio

from kvpool.sidecar.proto import sidecar_pb2_grpc as pb_grpc
from kvpool.sidecar.server import Sidecar, SidecarConfig


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


@pytest_asyncio.fixture
async def make_pair(tmp_path):
    """Start a prefill and a decode sidecar with the given options; stop them after."""
    started, channels = [], []

    async def make(prefill: dict | None = None, decode: dict | None = None):
        pair = []
        for name, options in (("prefill", prefill or {}), ("decode", decode or {})):
            s = Sidecar(SidecarConfig(local=f"unix://{tmp_path}/{name}{len(started)}.sock",
                                      lease_s=30, transfer_timeout_s=5, **options))
            await s.start()
            started.append(s)
            channel = grpc.aio.insecure_channel(s.config.local)
            channels.append(channel)
            pair.append((s, pb_grpc.LocalStub(channel)))
        return pair

    yield make
    for c in channels:
        await c.close()
    for s in started:
        await s.stop(grace=0)
