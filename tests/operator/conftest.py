"""Fixtures for the operator tests: the API emulator and the real operator, as subprocesses.

Both run on loopback with ports picked by the OS; both are stopped (and their logs shown
on failure) whatever happens in the test.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import kubernetes
import pytest

from kvpool.operator import kube

T = TypeVar("T")
REPO = pathlib.Path(__file__).resolve().parents[2]


def wait_for(probe: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds.

    Timeouts are generous: the suite shares small CI machines, and a passing probe returns
    at once whatever the limit.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child process whose output goes to a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, args: list[str], log: pathlib.Path, env: dict[str, str]) -> None:
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """A running API emulator; yields the path of its kubeconfig."""
    tmp = tmp_path_factory.mktemp("emulator")
    config = tmp / "kubeconfig"
    proc = Process([sys.executable, "-m", "kvpool.operator.emulator", "--kubeconfig", str(config)],
                   tmp / "emulator.log", dict(os.environ))
    try:
        wait_for(config.exists, 120, "the emulator's kubeconfig")
        yield config
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(emulator: pathlib.Path) -> kube.Client:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(emulator), client_configuration=configuration)
    return kube.Client(kubernetes.client.ApiClient(configuration), timeout_s=10)


def start_operator(kubeconfig: pathlib.Path, log: pathlib.Path, *args: str,
                   env: dict[str, str] | None = None) -> tuple[Process, int]:
    """Start ``kvpool operator`` against the emulator (``env``: more variables); return it
    once it is alive."""
    port = free_port()
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), KVPOOL_IMAGE="kvpool:test", **(env or {}))
    proc = Process([sys.executable, "-m", "kvpool.cli", "operator",
                    "--liveness", f"http://127.0.0.1:{port}/healthz", *args], log, env)
    try:
        wait_for(lambda: _alive(port), 120, "the operator's liveness endpoint")
    except BaseException:
        proc.stop()
        raise
    return proc, port


@pytest.fixture(scope="module")
def operator(emulator: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Process, int]]:
    """The real operator (``kvpool operator``) against the emulator; yields it and its
    liveness port."""
    proc, port = start_operator(emulator, tmp_path_factory.mktemp("operator") / "operator.log")
    try:
        yield proc, port
    finally:
        proc.stop()


def _alive(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the operator's log tail to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "operator" in getattr(item, "funcargs", {}):
        proc, _ = item.funcargs["operator"]
        report.sections.append(("operator log", proc.tail()))
