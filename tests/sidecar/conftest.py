"""Fixtures for the data-plane tests: real vLLM CPU engines started by kvpool.launch.

Engines take 20-40 s to start on this machine, so the two plain ones are shared by the
whole session; every process is stopped when the session ends, also after a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpool.launch import Launcher, Process


@pytest.fixture(scope="session")
def model_path() -> Path:
    from kvpool import models

    try:
        return models.model_dir()
    except models.ModelNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def engine_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """A launcher for processes shared by the session (stopped at its end)."""
    with Launcher(tmp_path_factory.mktemp("engines")) as launcher:
        yield launcher


@pytest.fixture(scope="session")
def plain_engines(engine_launcher: Launcher, model_path: Path) -> tuple[Process, Process]:
    """Two vLLM engines without a KV connector (started together, ready together)."""
    first = engine_launcher.start_engine("engine-a", model_path, max_model_len=4096)
    second = engine_launcher.start_engine("engine-b", model_path, max_model_len=4096)
    engine_launcher.wait_ready(first, second, timeout_s=240)
    return first, second
