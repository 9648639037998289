"""``kvpool bench operator``: reconcile latency and memory of the real operator.

Starts the API emulator (:mod:`kvpool.operator.emulator`) and ``kvpool operator`` as
subprocesses on loopback, then for each N creates N pools at once and times, per pool,
from its creation request to the moment its status is written for that generation (the
operator writes status only after every child is applied; the benchmark then checks
that every pool has all its children). Pools of a round are deleted before the next.
Prints one JSON object::

    {"pools": {"1": {"p50_s": …, "p95_s": …}, "10": …, "100": …}, "operator_rss_mb": …}

``operator_rss_mb`` is the operator's resident memory with the largest round's pools
alive. Every pool costs about 13 writes (finalizer, 10 children, status, kopf's
annotations) and 13 watch events; with N pools created at once, they share the CPU, so
p95 at N = 100 is close to the time the whole batch takes: kopf's per-event processing
and the Python emulator, on the same cores as the benchmark, bound it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import yaml
from rich.console import Console

from kvpool.operator import api, children, kube

POOLS = f"/apis/{api.API_VERSION}/namespaces/default/{api.PLURAL}"
CHILDREN_PER_POOL = 10
console = Console(stderr=True)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object (the only output format)")
    parser.add_argument("--sizes", default="1,10,100",
                        help="comma-separated numbers of pools per round (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a round may take before the benchmark fails")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(args: list[str], log: pathlib.Path,
             env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _wait_http(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                     "image": "vllm/vllm-openai:v0.11.0"}}


async def _watch(session: aiohttp.ClientSession, path: str) -> AsyncIterator[dict[str, Any]]:
    async with session.get(path, params={"watch": "true"},
                           timeout=aiohttp.ClientTimeout(total=None)) as response:
        async for line in response.content:
            if line.strip():
                yield json.loads(line)


async def _round(session: aiohttp.ClientSession, n: int, timeout: float) -> list[float]:
    """Create ``n`` pools; return each one's creation-to-status latency in seconds."""
    names = [f"bench-{n}-{i}" for i in range(n)]
    created: dict[str, float] = {}
    done: dict[str, float] = {}
    all_done = asyncio.Event()
    watching = asyncio.Event()

    async def watch() -> None:
        watching.set()
        async for event in _watch(session, POOLS):
            obj = event.get("object", {})
            name = obj.get("metadata", {}).get("name")
            st = obj.get("status") or {}
            if (name in created and name not in done and st.get("inputsHash")
                    and st.get("observedGeneration") == obj["metadata"].get("generation")):
                done[name] = time.monotonic()
                if len(done) == n:
                    all_done.set()

    watcher = asyncio.create_task(watch())
    await watching.wait()
    await asyncio.sleep(0.2)  # the watch request is in the emulator before the first pool
    try:
        for name in names:
            created[name] = time.monotonic()
            async with session.post(POOLS, json=_manifest(name)) as response:
                response.raise_for_status()
        await asyncio.wait_for(all_done.wait(), timeout)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await _check_children(session, names)
    return [done[name] - created[name] for name in names]


async def _check_children(session: aiohttp.ClientSession, names: list[str]) -> None:
    counts = dict.fromkeys(names, 0)
    for api_version, kind in (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
                              ("policy/v1", "PodDisruptionBudget")):
        async with session.get(kube.path(api_version, kind, "default")) as response:
            for item in (await response.json())["items"]:
                pool = item["metadata"].get("labels", {}).get(children.POOL_LABEL)
                if pool in counts:
                    counts[pool] += 1
    short = {k: v for k, v in counts.items() if v != CHILDREN_PER_POOL}
    if short:
        raise RuntimeError(f"pools without all {CHILDREN_PER_POOL} children: {short}")


async def _delete_all(session: aiohttp.ClientSession, names: list[str], timeout: float) -> None:
    for name in names:
        async with session.delete(f"{POOLS}/{name}") as response:
            response.raise_for_status()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(POOLS) as response:
            if not (await response.json())["items"]:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("pools were not released after deletion")


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _bench(url: str, operator_pid: int, liveness: str, sizes: list[int],
                 timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"pools": {}}
    async with aiohttp.ClientSession(url) as session, aiohttp.ClientSession() as probe:
        await _wait_http(probe, liveness, 60)
        for i, n in enumerate(sizes):
            console.print(f"[bold]round {n}[/]: creating {n} pool(s)")
            latencies = await _round(session, n, timeout)
            result["pools"][str(n)] = {
                "p50_s": round(_percentile(latencies, 50), 4),
                "p95_s": round(_percentile(latencies, 95), 4),
            }
            console.print(f"  p50 {result['pools'][str(n)]['p50_s']} s, "
                          f"p95 {result['pools'][str(n)]['p95_s']} s")
            if n == max(sizes):
                result["operator_rss_mb"] = round(_rss_mb(operator_pid), 1)
            if i < len(sizes) - 1:
                console.print(f"  deleting {n} pool(s)")
                await _delete_all(session, [f"bench-{n}-{j}" for j in range(n)], timeout)
    return result


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit("--sizes needs positive integers, e.g. 1,10,100")
    with tempfile.TemporaryDirectory(prefix="kvpool-bench-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        config = tmp / "kubeconfig"
        env = dict(os.environ)
        with _process([sys.executable, "-m", "kvpool.operator.emulator",
                       "--kubeconfig", str(config)], tmp / "emulator.log", env):
            deadline = time.monotonic() + 30
            while not config.exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the API emulator did not start")
                time.sleep(0.1)
            url = yaml.safe_load(config.read_text())["clusters"][0]["cluster"]["server"]
            liveness = f"http://127.0.0.1:{_free_port()}/healthz"
            op_env = dict(env, KUBECONFIG=str(config))
            with _process([sys.executable, "-m", "kvpool.cli", "operator", "--liveness",
                           liveness], tmp / "operator.log", op_env) as operator:
                try:
                    result = asyncio.run(_bench(url, operator.pid, liveness, sizes,
                                                args.timeout))
                except Exception:
                    console.print((tmp / "operator.log").read_text()[-4000:])
                    raise
    print(json.dumps(result))
    return 0
