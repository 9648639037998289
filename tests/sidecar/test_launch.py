"""kvpool.launch: processes start on free ports, become ready, and all of them stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from kvpool.launch import (
    HttpReady,
    Launcher,
    LaunchError,
    Process,
    cpu_engine_dtype,
    free_port,
    vllm_argv,
)


def _http_server(launcher: Launcher, name: str) -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    return launcher.start(name, argv, ready=HttpReady(f"http://127.0.0.1:{port}/"), port=port)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it holds no resources
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_start_wait_stop(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    with Launcher(tmp_path, on_event=lambda n, s, d: events.append((n, s))) as launcher:
        first, second = _http_server(launcher, "one"), _http_server(launcher, "two")
        assert first.port != second.port
        launcher.wait_ready(first, second, timeout_s=30)
        with urllib.request.urlopen(first.url + "/") as response:
            assert response.status == 200
        assert first.ready_after_s is not None and first.ready_after_s < 30
    assert first.popen.returncode is not None and second.popen.returncode is not None
    assert ("one", "ready") in events and ("two", "stopped") in events
    assert (tmp_path / "logs" / "one.log").read_text().startswith("$ ")


def test_early_exit_raises_with_log(tmp_path: Path) -> None:
    script = "import sys; print('model file is missing'); sys.exit(3)"
    with Launcher(tmp_path) as launcher:
        process = launcher.start(
            "broken", [sys.executable, "-c", script], ready=HttpReady("http://127.0.0.1:9/")
        )
        with pytest.raises(LaunchError, match="exited with code 3(.|\n)*model file is missing"):
            launcher.wait_ready(process, timeout_s=30)


def test_not_ready_in_time(tmp_path: Path) -> None:
    with Launcher(tmp_path) as launcher:
        process = launcher.start(
            "silent",
            [sys.executable, "-c", "import time; time.sleep(60)"],
            ready=HttpReady(f"http://127.0.0.1:{free_port()}/"),
        )
        with pytest.raises(LaunchError, match="not ready after 1 s"):
            launcher.wait_ready(process, timeout_s=1)
    assert not process.alive()


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A child's own children (vLLM's engine core) stop with it, even if it ignores SIGTERM."""
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """)
    with Launcher(tmp_path, stop_grace_s=1) as launcher:
        parent = launcher.start("stubborn", [sys.executable, "-c", script])
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
    assert _gone(parent.pid)
    deadline = time.monotonic() + 10
    while not _gone(grandchild):
        assert time.monotonic() < deadline, "the grandchild survived"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_everything(tmp_path: Path, signum: int) -> None:
    """A program using the launcher, interrupted while it waits, leaves nothing behind."""
    pids = tmp_path / "pids.json"
    program = textwrap.dedent(f"""
        import json, sys, time
        from kvpool.launch import Launcher, HttpReady, free_port
        with Launcher({str(tmp_path)!r}) as launcher:
            procs = [launcher.start(f"sleeper{{i}}", [sys.executable, "-c", "import time; time.sleep(600)"])
                     for i in range(2)]
            open({str(pids)!r}, "w").write(json.dumps([p.pid for p in procs]))
            time.sleep(600)
    """)
    runner = subprocess.Popen([sys.executable, "-c", program])
    try:
        deadline = time.monotonic() + 60
        while not pids.exists() or not pids.read_text():
            assert time.monotonic() < deadline and runner.poll() is None
            time.sleep(0.1)
        children = json.loads(pids.read_text())
        runner.send_signal(signum)
        runner.wait(timeout=30)
    finally:
        runner.kill()
    for pid in children:
        assert _gone(pid), f"child {pid} survived {signal.Signals(signum).name}"


@pytest.mark.parametrize(("flags", "dtype"), [
    ("fpu sse2 avx avx2 fma", "float32"),
    ("fpu avx2 avx512f avx512bw", "float32"),
    ("fpu avx2 avx512f avx512_bf16", "bfloat16"),
    ("fpu avx2 amx_tile amx_bf16", "bfloat16"),
])
def test_engine_dtype_follows_native_bf16(tmp_path: Path, flags: str, dtype: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: CPU\nflags\t\t: {flags}\n\n")
    assert cpu_engine_dtype(cpuinfo) == dtype
    assert cpu_engine_dtype(tmp_path / "missing") == "float32"


def test_engine_argv_names_the_dtype(tmp_path: Path) -> None:
    argv = vllm_argv(tmp_path, 8000)
    assert argv[argv.index("--dtype") + 1] == cpu_engine_dtype()


def test_names_are_unique(tmp_path: Path) -> None:
    with Launcher(tmp_path) as launcher:
        _http_server(launcher, "same")
        with pytest.raises(ValueError, match="already started"):
            _http_server(launcher, "same")


@pytest.mark.slow
def test_real_engine_answers(
    plain_engines: tuple[Process, Process], engine_launcher: Launcher
) -> None:
    """Engines started by the launcher (the session's shared pair) serve completions."""
    engine = plain_engines[0]
    assert "--enforce-eager" in engine.argv and "--block-size" in engine.argv
    body = {"model": "smollm2-135m", "prompt": "The capital of France is",
            "max_tokens": 8, "temperature": 0}  # fmt: skip
    request = urllib.request.Request(
        engine.url + "/v1/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.load(response)
    assert reply["usage"]["completion_tokens"] == 8
    assert "Paris" in reply["choices"][0]["text"]
    rpc_dir = engine_launcher.rpc_dir(engine.name)
    assert rpc_dir.is_dir() and any(rpc_dir.iterdir())  # vLLM's IPC sockets live there
