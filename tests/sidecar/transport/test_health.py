"""Transfer health: the window's rates, the operator's verdict, metrics and the JSON endpoint."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from kvpool.sidecar.health import HealthThresholds, TransferHealth, add_routes


class Clock:
    """A clock the test moves by hand (the window is minutes long)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _samples(health: TransferHealth) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(health.metrics_text().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_idle_until_enough_transfers():
    health = TransferHealth(clock=Clock())
    health.transfer_done(1000, 250, 0.01)
    summary = health.summary()
    assert summary["healthy"] and summary["reason"] == "Idle"


def test_succeeding_transfers_report_throughput_savings_and_level_mix():
    clock = Clock()
    health = TransferHealth(clock=clock)
    for _ in range(8):
        health.transfer_done(4_000_000, 1_000_000, 0.02)
    for level in ("raw", "default", "default", "low"):
        health.chunk(level)
    s = health.summary()
    assert (s["healthy"], s["reason"]) == (True, "TransfersSucceeding")
    assert s["throughput_bps"] == 4_000_000 / 0.02
    assert s["bytes_saved"] == 8 * 3_000_000
    assert s["level_mix"] == {"default": 0.5, "low": 0.25, "raw": 0.25}


def test_failures_turn_the_verdict_and_age_out_of_the_window():
    clock = Clock()
    health = TransferHealth(clock=clock, thresholds=HealthThresholds(window_s=60))
    for _ in range(9):
        health.transfer_done(1000, 1000, 0.001)
    health.transfer_failed("checksum")
    s = health.summary()
    assert (s["healthy"], s["reason"]) == (False, "TransfersFailing")
    assert s["failure_rate"] == 0.1 and s["recomputed"] == 1
    clock.now += 61
    for _ in range(5):
        health.transfer_done(1000, 1000, 0.001)
    assert health.summary()["reason"] == "TransfersSucceeding"


def test_frequent_recompute_is_unhealthy():
    health = TransferHealth(clock=Clock())
    for _ in range(6):
        health.transfer_done(1000, 100, 0.001)
    for _ in range(3):
        health.recompute_chosen("deadline")
    s = health.summary()
    assert (s["healthy"], s["reason"]) == (False, "FrequentRecompute")
    assert s["failed"] == 0 and s["recomputed"] == 3


def test_prometheus_metrics_count_since_start():
    health = TransferHealth(clock=Clock())
    health.transfer_done(4000, 1000, 0.5)
    health.transfer_failed("timeout")
    health.recompute_chosen()
    health.chunk("low")
    m = _samples(health)
    assert m[("kvpool_transfers_total", (("outcome", "ok"),))] == 1
    assert m[("kvpool_transfers_total", (("outcome", "failed"),))] == 1
    assert m[("kvpool_recompute_fallbacks_total", (("reason", "timeout"),))] == 1
    assert m[("kvpool_recompute_fallbacks_total", (("reason", "deadline"),))] == 1
    assert m[("kvpool_chunks_by_level_total", (("level", "low"),))] == 1
    assert m[("kvpool_transfer_raw_bytes_total", ())] == 4000
    assert m[("kvpool_transfer_throughput_bytes_per_second", ())] == 8000
    assert abs(m[("kvpool_transfer_failure_rate", ())] - 1 / 3) < 1e-9


def test_summary_and_metrics_served_over_http():
    health = TransferHealth(role="prefill", clock=Clock())
    health.transfer_done(2048, 512, 0.001)

    async def scenario() -> None:
        app = web.Application()
        add_routes(app, health)
        async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
            resp = await client.get("/transfer/health")
            assert resp.status == 200
            body = await resp.json()
            assert body["role"] == "prefill" and body["bytes_saved"] == 1536
            resp = await client.get("/metrics")
            assert resp.status == 200
            assert "kvpool_transfers_total" in await resp.text()

    asyncio.run(scenario())


def test_existing_metrics_route_is_kept():
    health = TransferHealth()
    app = web.Application()

    async def sidecar_metrics(_request):
        return web.Response(text="sidecar")

    app.router.add_get("/metrics", sidecar_metrics)
    add_routes(app, health)
    assert sum(1 for r in app.router.resources() if r.canonical == "/metrics") == 1
