"""Suite-wide test configuration: markers that skip themselves where the hardware is absent."""

from __future__ import annotations

import functools
import os
import subprocess

import pytest


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA device is usable (checked in a subprocess: no CUDA state leaks here)."""
    if os.environ.get("KVPOOL_FORCE_NO_CUDA"):
        return False
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
