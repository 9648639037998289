"""``kvpool demo`` end to end: real engines, sidecars and router; nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpool.launch import LAUNCH_DIR_ENV


def _processes_of(workdir: Path) -> list[int]:
    """Live processes started for this work folder (tagged in their environment)."""
    marker = f"{LAUNCH_DIR_ENV}={workdir.resolve()}".encode() + b"\0"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().split()[2] == "Z":
                continue
            if (
                marker in (proc / "cmdline").read_bytes()
                or marker in (proc / "environ").read_bytes()
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, model_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "kvpool", "demo", "--workdir", str(workdir),
         "--long-prompt-tokens", "0", "--max-tokens", "8", "--level", "lossless"],
        capture_output=True, text=True, timeout=480, check=False, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    output = result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "first answer" in output
    assert "no: recomputed" not in output, output[-3000:]
    # three prompts: KV loaded (bit-exact) and the same answer as one engine, for each
    rows = [line for line in output.splitlines() if line.count("yes") == 2]
    assert len(rows) == 3, output[-3000:]
    for name in ("prefill-vllm", "decode-vllm", "prefill-sidecar", "decode-sidecar", "router"):
        assert (workdir / "logs" / f"{name}.log").is_file()
    assert _processes_of(workdir) == []


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path: Path, model_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "kvpool", "demo", "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        engine_log = workdir / "logs" / "decode-vllm.log"
        deadline = time.monotonic() + 120
        while not engine_log.exists() or len(_processes_of(workdir)) < 5:
            assert demo.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(3)  # the engines are importing vLLM
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode != 0
    assert "stopped" in stderr
    deadline = time.monotonic() + 15
    while _processes_of(workdir):
        assert time.monotonic() < deadline, f"left running: {_processes_of(workdir)}"
        time.sleep(0.5)
