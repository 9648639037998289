"""A short atheris run of ``kvpool fuzz codec`` (the long runs are for people and CI)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_fuzz_codec_runs_clean(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvpool", "fuzz", "codec", "--seconds", "8", "--seed", "1",
         "--corpus", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Done" in log and "stat::number_of_executed_units" in log
    assert not list(tmp_path.glob("crash-*"))
