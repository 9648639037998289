"""The real SmolLM2 KV cache the kernels tests share (loaded once per test session)."""

from __future__ import annotations

import functools

import pytest
import torch

from kvpool import models

SMALL_TOKENS = 96
"""Prompt tokens for the tests: enough for real attention patterns, quick on two cores."""


def have_model() -> bool:
    try:
        models.gguf_path()
    except models.ModelNotFound:
        return False
    return True


needs_model = pytest.mark.skipif(not have_model(), reason="SmolLM2 package not installed")


@functools.cache
def smollm2():
    from kvpool.kernels.realkv import load_model

    torch.set_num_threads(1)  # the CI machine is small and shared: one thread is fastest
    return load_model()


@functools.cache
def small_real():
    from kvpool.kernels.realkv import extract

    return extract(smollm2(), tokens=SMALL_TOKENS, next_tokens=257)


@functools.cache
def small_harness():
    from kvpool.kernels.quality import QualityHarness

    return QualityHarness(small_real())
