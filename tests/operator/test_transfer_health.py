"""The pool's ``TransferHealthy`` condition and ``status.transfer``, from the sidecars.

Real health endpoints (:func:`kvpool.sidecar.health.add_routes` on aiohttp servers on
loopback, fed by a real :class:`~kvpool.sidecar.health.TransferHealth`) stand in for the
sidecars; the pods that point at them are objects in the API emulator (no kubelet runs
here, so a test writes their status). The aggregation is checked alone, through
:func:`kvpool.operator.transfer.collect` against the emulator, and through the real
operator, whose timer reads them every second here.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from kvpool.operator import api, kube, schema, status, transfer
from kvpool.sidecar.health import TransferHealth
from tests.operator.conftest import free_port, start_operator, wait_for
from tests.operator.test_operator import (
    MERGE,
    NS,
    condition,
    get_pool,
    manifest,
    play_deployment_controller,
    settled,
)

MB = 1 << 20


class HealthServer:
    """A sidecar's ``/transfer/health`` on loopback (its own thread and event loop)."""

    def __init__(self) -> None:
        self.health = TransferHealth(role="sidecar")
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _serve(self) -> None:
        from kvpool.sidecar import health

        async def start() -> None:
            app = web.Application()
            health.add_routes(app, self.health)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def delivered(self, n: int, raw: int = 4 * MB, wire: int = MB) -> None:
        for _ in range(n):
            self.health.transfer_done(raw, wire, 0.01)


@pytest.fixture
def servers() -> Iterator[list[HealthServer]]:
    started: list[HealthServer] = []
    yield started
    for server in started:
        server.stop()


def pod(pool: str, name: str, role: str, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"kvpool.dev/pool": pool, "kvpool.dev/role": role}},
        "spec": {"containers": [
            {"name": "vllm", "image": "vllm", "ports": [{"name": "http", "containerPort": 1}]},
            {"name": "sidecar", "image": "kvpool",
             "ports": [{"name": "kv", "containerPort": 50051},
                       {"name": "metrics", "containerPort": metrics_port}]}]},
    }


def run_pod(client: kube.Client, pool: str, name: str, role: str, metrics_port: int) -> None:
    """A worker pod of ``pool`` whose sidecar's metrics port is ``metrics_port`` on loopback,
    running (the test plays the kubelet)."""
    client.create(pod(pool, name, role, metrics_port))
    client.request("PATCH", kube.path("v1", "Pod", NS, name, "status"),
                   body={"status": {"phase": "Running", "podIP": "127.0.0.1"}},
                   content_type=MERGE)


# ---- the aggregation alone ------------------------------------------------------------------


def summary(**counts: Any) -> dict[str, Any]:
    health = TransferHealth()
    for _ in range(counts.get("ok", 0)):
        health.transfer_done(4 * MB, MB, 0.01)
    for _ in range(counts.get("failed", 0)):
        health.transfer_failed("timeout")
    return health.summary()


def test_healthy_sidecars_sum_their_savings() -> None:
    verdict = transfer.aggregate({"a": summary(ok=3), "b": summary(ok=4)})
    assert (verdict.status, verdict.reason) == ("True", "TransfersSucceeding")
    assert verdict.summary["bytesSaved"] == 7 * 3 * MB
    assert verdict.summary["transfers"] == 7 and verdict.summary["sidecars"] == "2/2"


def test_failure_reasons_and_transports_are_summed() -> None:
    a, b = TransferHealth(), TransferHealth()
    a.transfer_failed("peer_restarted")
    b.transfer_failed("peer_restarted")
    b.transfer_failed("timeout")
    a.transport("nixl")
    b.transport("grpc", fallback=True)
    b.transport("grpc")
    old = summary(ok=1)  # a sidecar of an older release sends neither
    for key in ("failure_reasons", "transports", "transport_fallbacks"):
        old.pop(key, None)
    verdict = transfer.aggregate({"a": a.summary(), "b": b.summary(), "c": old})
    assert verdict.summary["failureReasons"] == {"peer_restarted": 2, "timeout": 1}
    assert verdict.summary["transports"] == {"grpc": 2, "nixl": 1}
    assert verdict.summary["transportFallbacks"] == 1


def test_byte_counts_are_int64_in_the_schema() -> None:
    """A busy pool moves more than 2 GiB in a window: byte counts must not be int32."""
    from kvpool.operator import crd

    props = crd.kvcachepool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["status"]["properties"]["transfer"]["properties"]
    assert {props[k]["format"] for k in ("bytesSaved", "rawBytes", "wireBytes")} == {"int64"}
    verdict = transfer.aggregate({"a": summary(ok=1)})
    loaded = schema.load(api.TransferStatus, {**verdict.summary, "rawBytes": 5 << 30})
    assert loaded.raw_bytes == 5 << 30


def test_failures_summed_over_sidecars_turn_it_false() -> None:
    # Each sidecar alone is too idle to judge; together they fail too often.
    verdict = transfer.aggregate({"a": summary(ok=2, failed=1), "b": summary(ok=1, failed=1)})
    assert (verdict.status, verdict.reason) == ("False", "TransfersFailing")
    assert "2 of 5 transfers failed" in verdict.message


def test_a_silent_sidecar_is_named_and_none_answering_is_unknown() -> None:
    partial = transfer.aggregate({"a": summary(ok=6), "b": None})
    assert partial.status == "True" and "1 of 2 sidecars answered (not: b)" in partial.message
    assert partial.summary["sidecars"] == "1/2"
    none = transfer.aggregate({"a": None, "b": None})
    assert (none.status, none.reason, none.summary) == ("Unknown", transfer.UNREACHABLE, None)
    assert transfer.aggregate({}).status == "Unknown"


def test_status_carries_the_condition_and_keeps_its_transition_time() -> None:
    from kvpool.operator import children

    spec = api.load_spec(manifest("x")["spec"])
    args = {"pool": children.PoolRef("x", NS, "u"), "generation": 1, "spec": spec,
            "digest": "d", "endpoint": "e", "workloads": {}, "missing": [], "problem": None}
    first = status.compute(**args)
    assert condition({"status": first}, "TransferHealthy")["reason"] == "NotMeasured"
    healthy = transfer.aggregate({"a": summary(ok=6)})
    second = status.compute(**args, previous=first["conditions"], transfer=healthy)
    cond = condition({"status": second}, "TransferHealthy")
    assert cond["status"] == "True" and second["transfer"]["bytesSaved"] == 18 * MB
    again = status.compute(**args, previous=second["conditions"],
                           transfer=transfer.aggregate({"a": summary(ok=7)}))
    assert condition({"status": again}, "TransferHealthy")["lastTransitionTime"] == \
        cond["lastTransitionTime"]
    assert transfer.TransferVerdict.from_status(second) == healthy


# ---- reading real endpoints -----------------------------------------------------------------


def test_collect_reads_every_running_sidecar_of_the_pool(client: kube.Client,
                                                         servers: list[HealthServer]) -> None:
    servers += [HealthServer(), HealthServer()]
    servers[0].delivered(3)
    servers[1].delivered(3, raw=2 * MB)
    run_pod(client, "coll", "coll-prefill-0", "prefill", servers[0].port)
    run_pod(client, "coll", "coll-decode-0", "decode", servers[1].port)
    run_pod(client, "coll", "coll-decode-1", "decode", free_port())  # nobody listens
    run_pod(client, "other", "other-decode-0", "decode", servers[0].port)  # another pool
    client.create(pod("coll", "coll-decode-2", "decode", servers[0].port))  # not running

    def list_pods() -> list[dict[str, Any]]:
        return client.list("v1", "Pod", NS, "kvpool.dev/pool=coll")

    verdict = asyncio.run(transfer.collect(list_pods, "coll", timeout_s=2.0))
    assert (verdict.status, verdict.reason) == ("True", "TransfersSucceeding")
    assert verdict.summary["bytesSaved"] == 3 * 3 * MB + 3 * MB
    assert verdict.summary["sidecars"] == "2/3"
    assert "not: coll-decode-1" in verdict.message


# ---- through the real operator --------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_operator(emulator: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """The operator reading the sidecars every second."""
    proc, _ = start_operator(emulator, tmp_path_factory.mktemp("op") / "operator.log",
                                env={"KVPOOL_TRANSFER_HEALTH_INTERVAL_S": "1"})
    try:
        yield proc
    finally:
        proc.stop()


def transfer_condition(client: kube.Client, name: str) -> dict[str, Any]:
    return condition(get_pool(client, name), "TransferHealthy")


def test_operator_folds_sidecar_health_into_the_pool(client: kube.Client, fast_operator: Any,
                                                     servers: list[HealthServer]) -> None:
    client.create(manifest("fold"))
    wait_for(lambda: settled(client, "fold", 1), what="fold created")
    assert transfer_condition(client, "fold")["reason"] in ("NotMeasured", transfer.NO_READY)
    servers.append(HealthServer())
    servers[0].delivered(6)
    run_pod(client, "fold", "fold-decode-0", "decode", servers[0].port)
    play_deployment_controller(client, "fold")  # pods ready: the operator starts asking

    healthy = wait_for(lambda: transfer_condition(client, "fold").get("status") == "True"
                       and get_pool(client, "fold"), what="TransferHealthy=True")
    assert condition(healthy, "TransferHealthy")["reason"] == "TransfersSucceeding"
    assert healthy["status"]["transfer"]["bytesSaved"] == 6 * 3 * MB
    assert condition(healthy, "Ready")["status"] == "True"  # the other conditions stay

    for _ in range(3):
        servers[0].health.transfer_failed("timeout")
    failing = wait_for(lambda: transfer_condition(client, "fold").get("status") == "False"
                       and transfer_condition(client, "fold"), what="TransferHealthy=False")
    assert failing["reason"] == "TransfersFailing" and "3 of 9" in failing["message"]

    servers[0].stop()
    servers.clear()
    gone = wait_for(lambda: transfer_condition(client, "fold").get("status") == "Unknown"
                    and transfer_condition(client, "fold"), what="TransferHealthy=Unknown")
    assert gone["reason"] == transfer.UNREACHABLE
    assert fast_operator.proc.poll() is None
