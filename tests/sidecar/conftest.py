"""Fixtures for the transfer tests: real sidecars and real vLLM CPU engines as processes.

Every process is started in its own session and killed (the whole group) at teardown,
also when a test fails. Ports are picked free at start; sockets and vLLM's RPC files live
under the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpool import launch

ENGINE_START_S = 900
"""The engines start in 20-80 s alone; on a 2-core machine shared with other work, minutes."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # the group: engine-core children too
        self.popen.wait(15)
        self._log.close()


class SidecarProcess(Process):
    """``kvpool sidecar`` as a process; ``wait=False`` returns at once (call
    :meth:`wait_ready`), so that several start together."""

    def __init__(self, name: str, folder: Path, level: str = "raw", *,
                 peer: str = "127.0.0.1:0", transfer_timeout: float = 60,
                 lease: float | None = None, wait: bool = True,
                 extra: tuple[str, ...] = ()):
        self.socket = folder / f"{name}.sock"
        self.ready = folder / f"{name}.ready"
        self.ready.unlink(missing_ok=True)
        lease_args = ["--lease", str(lease)] if lease is not None else []
        super().__init__(name, [
            sys.executable, "-m", "kvpool", "sidecar", "--local", f"unix://{self.socket}",
            "--peer", peer, "--metrics", "127.0.0.1:0", "--level", level,
            "--transfer-timeout", str(transfer_timeout), *lease_args,
            "--ready-file", str(self.ready), *extra,
        ], folder)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 60) -> SidecarProcess:
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar {self.name} did not start:\n{self.tail()}")
            time.sleep(0.1)
        info = json.loads(self.ready.read_text())
        self.peer, self.metrics = info["peer"], info["metrics"]
        self.instance, self.transports = info["instance"], info["transports"]
        return self

    def health(self) -> dict:
        """The sidecar's ``/transfer/health`` summary."""
        url = f"http://{self.metrics}/transfer/health"
        return json.loads(urllib.request.urlopen(url, timeout=10).read())

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the sidecar's Prometheus metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return sample.value
        return 0.0


def engine_argv(port: int, sidecar_socket: Path) -> list[str]:
    from kvpool.models import model_dir
    from kvpool.sidecar.vllm_args import kv_transfer_config

    transfer = kv_transfer_config(f"unix://{sidecar_socket}", load_timeout_s=120)
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir()), "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "4096", "--block-size", "32", "--dtype", "float32",
        "--optimization-level", "0", "--max-num-batched-tokens", "512",
        "--kv-transfer-config", json.dumps(transfer),
    ]


class EngineProcess(Process):
    def __init__(self, name: str, folder: Path, sidecar: SidecarProcess):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rpc = folder / f"{name}-rpc"
        rpc.mkdir(exist_ok=True)
        super().__init__(name, engine_argv(self.port, sidecar.socket), folder, env={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_RPC_BASE_PATH": str(rpc),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        })

    def wait_ready(self) -> None:
        deadline = time.monotonic() + ENGINE_START_S
        while True:
            if not self.alive():
                raise RuntimeError(f"engine {self.name} exited:\n{self.tail()}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5)
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {self.name} not ready:\n{self.tail()}") from None
                time.sleep(1)

    def complete(self, prompt: str, max_tokens: int, kv_transfer_params: dict | None = None,
                 timeout: float = 300) -> dict:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "return_token_ids": True}
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        request = urllib.request.Request(
            f"{self.url}/v1/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    """Prefill and decode: a sidecar and a vLLM engine (with KVPoolConnector) each."""
    folder = tmp_path_factory.mktemp("pd")
    started: list[Process] = []
    try:
        p_sidecar = SidecarProcess("prefill-sidecar", folder)
        started.append(p_sidecar)
        d_sidecar = SidecarProcess("decode-sidecar", folder)
        started.append(d_sidecar)
        prefill = EngineProcess("prefill-engine", folder, p_sidecar)
        started.append(prefill)
        decode = EngineProcess("decode-engine", folder, d_sidecar)
        started.append(decode)
        prefill.wait_ready()
        decode.wait_ready()
        yield {"prefill": prefill, "decode": decode, "p_sidecar": p_sidecar,
               "d_sidecar": d_sidecar, "folder": folder, "started": started}
    finally:
        for process in reversed(started):
            process.stop()


# ---- plain engines (no KV connector) started with kvpool.launch, for the router tests ----


@pytest.fixture(scope="session")
def model_path() -> Path:
    from kvpool import models

    try:
        return models.model_dir()
    except models.ModelNotFound as exc:
        pytest.fail(f"{exc} (make install puts it in place)")


@pytest.fixture(scope="session")
def engine_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launch.Launcher]:
    """A launcher for processes shared by the session (all stopped at its end)."""
    with launch.Launcher(tmp_path_factory.mktemp("engines")) as launcher:
        yield launcher


@pytest.fixture(scope="session")
def plain_engines(
    engine_launcher: launch.Launcher, model_path: Path
) -> tuple[launch.Process, launch.Process]:
    """Two vLLM engines without a KV connector, started together (20-40 s each alone)."""
    first = engine_launcher.start_engine("engine-a", model_path, max_model_len=4096)
    second = engine_launcher.start_engine("engine-b", model_path, max_model_len=4096)
    engine_launcher.wait_ready(first, second, timeout_s=ENGINE_START_S)
    return first, second
