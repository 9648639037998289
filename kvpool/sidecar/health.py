"""Transfer health: what the operator needs to know about a sidecar's KV transfers.

:class:`TransferHealth` records every finished transfer (outcome, bytes raw and on the
wire, seconds) and every chunk's level, keeps the recent ones in a sliding time window,
and reports them two ways:

- Prometheus metrics on the sidecar's ``/metrics`` (counters since start, and gauges over
  the window: failure rate, achieved throughput);
- a JSON summary (:meth:`TransferHealth.summary`, served at ``/transfer/health`` by
  :func:`add_routes`) that the operator folds into the pool's ``TransferHealthy``
  condition: ``healthy`` with a CamelCase ``reason`` and a ``message``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

OUTCOMES = ("ok", "failed", "recompute")


@dataclass(frozen=True)
class HealthThresholds:
    """When the transfers of a sidecar count as unhealthy."""

    window_s: float = 300.0
    """Seconds of history the rates are computed over (default 5 min: long enough to
    smooth single failures, short enough to clear soon after a fix)."""
    max_failure_rate: float = 0.05
    """Largest fraction of transfers in the window that may fail (default 5%)."""
    max_recompute_rate: float = 0.25
    """Largest fraction of requests in the window that may fall back to recompute
    (default 25%: an adaptive policy on a starved link recomputes some on purpose)."""
    min_transfers: int = 5
    """Fewer transfers than this in the window give no verdict on rates (``Idle``)."""


@dataclass(frozen=True)
class _Event:
    at: float
    outcome: str
    raw_bytes: int
    wire_bytes: int
    seconds: float
    reason: str = ""


class TransferHealth:
    """Thread-safe record of recent transfers with Prometheus metrics and a JSON summary.

    ``role`` (prefill or decode) labels nothing but the summary; the metrics carry the
    names the sidecar exports. Use one instance per sidecar process and its ``registry``.
    """

    def __init__(self, *, role: str = "decode", thresholds: HealthThresholds | None = None,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.role = role
        self.thresholds = thresholds or HealthThresholds()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._events: collections.deque[_Event] = collections.deque()
        self._levels: collections.deque[tuple[float, str]] = collections.deque()
        self._transports: collections.deque[tuple[float, str, bool]] = collections.deque()
        self._transfers = Counter("kvpool_transfers", "KV transfers by outcome",
                                  ["outcome"], registry=self.registry)
        self._recomputes = Counter("kvpool_recompute_fallbacks",
                                   "Requests whose KV did not arrive, recomputed by decode",
                                   ["reason"], registry=self.registry)
        self._chunks = Counter("kvpool_chunks_by_level", "Chunks sent or received by level",
                               ["level"], registry=self.registry)
        self._raw = Counter("kvpool_transfer_raw_bytes", "Uncompressed KV bytes transferred",
                            registry=self.registry)
        self._wire = Counter("kvpool_transfer_wire_bytes", "KV bytes on the wire",
                             registry=self.registry)
        for outcome in OUTCOMES:
            self._transfers.labels(outcome)
        Gauge("kvpool_transfer_failure_rate", "Failed transfers / transfers, recent window",
              registry=self.registry).set_function(lambda: self.summary()["failure_rate"])
        Gauge("kvpool_transfer_recompute_rate", "Recompute fallbacks / requests, recent window",
              registry=self.registry).set_function(lambda: self.summary()["recompute_rate"])
        Gauge("kvpool_transfer_throughput_bytes_per_second",
              "Raw KV bytes delivered per second of transfer time, recent window",
              registry=self.registry).set_function(lambda: self.summary()["throughput_bps"])

    # -- recording -------------------------------------------------------------------------

    def transfer_done(self, raw_bytes: int, wire_bytes: int, seconds: float) -> None:
        """A transfer delivered its KV."""
        self._add(_Event(self._clock(), "ok", raw_bytes, wire_bytes, seconds))
        self._raw.inc(raw_bytes)
        self._wire.inc(wire_bytes)

    def transfer_failed(self, reason: str, *, recomputed: bool = True) -> None:
        """A transfer failed (``reason``: timeout, checksum, peer, peer_restarted, codec,
        profile_mismatch, ...); by default decode recomputed the request, which is counted
        as a fallback too."""
        self._add(_Event(self._clock(), "failed", 0, 0, 0.0, reason))
        if recomputed:
            self._recomputes.labels(reason).inc()

    def recompute_chosen(self, reason: str = "deadline") -> None:
        """The sender decided not to send (the KV could not arrive in time): decode recomputes."""
        self._add(_Event(self._clock(), "recompute", 0, 0, 0.0))
        self._recomputes.labels(reason).inc()

    def chunk(self, level: str) -> None:
        """One chunk went (or came) at ``level`` (``raw`` or a codec level)."""
        with self._lock:
            self._levels.append((self._clock(), level))
        self._chunks.labels(level).inc()

    def transport(self, name: str, *, fallback: bool = False) -> None:
        """A transfer went (or came) over transport ``name``; ``fallback``: this sidecar
        prefers NIXL and the pair could not use it."""
        with self._lock:
            self._transports.append((self._clock(), name, fallback))

    def _add(self, event: _Event) -> None:
        with self._lock:
            self._events.append(event)
        self._transfers.labels(event.outcome).inc()

    # -- reporting -------------------------------------------------------------------------

    def _trim(self, now: float) -> None:
        horizon = now - self.thresholds.window_s
        while self._events and self._events[0].at < horizon:
            self._events.popleft()
        while self._levels and self._levels[0][0] < horizon:
            self._levels.popleft()
        while self._transports and self._transports[0][0] < horizon:
            self._transports.popleft()

    def summary(self) -> dict:
        """The recent window as a JSON-ready dict; ``healthy``/``reason``/``message`` give
        the verdict the operator writes into the ``TransferHealthy`` condition."""
        t = self.thresholds
        with self._lock:
            self._trim(self._clock())
            events = list(self._events)
            levels = [lv for _, lv in self._levels]
            transports = list(self._transports)
        n = len(events)
        by = collections.Counter(e.outcome for e in events)
        ok = [e for e in events if e.outcome == "ok"]
        raw = sum(e.raw_bytes for e in ok)
        wire = sum(e.wire_bytes for e in ok)
        busy = sum(e.seconds for e in ok)
        failure_rate = by["failed"] / n if n else 0.0
        recompute_rate = (by["failed"] + by["recompute"]) / n if n else 0.0
        mix = collections.Counter(levels)
        healthy, reason, message = verdict(n, by["failed"], by["failed"] + by["recompute"], t)
        return {
            "role": self.role,
            "window_s": t.window_s,
            "transfers": n,
            "ok": by["ok"],
            "failed": by["failed"],
            "recomputed": by["recompute"] + by["failed"],
            "failure_rate": failure_rate,
            "recompute_rate": recompute_rate,
            "throughput_bps": raw / busy if busy > 0 else 0.0,
            "raw_bytes": raw,
            "wire_bytes": wire,
            "bytes_saved": raw - wire,
            "level_mix": {lv: c / len(levels) for lv, c in sorted(mix.items())},
            "failure_reasons": dict(sorted(collections.Counter(
                e.reason for e in events if e.outcome == "failed").items())),
            "transports": dict(sorted(collections.Counter(t for _, t, _ in transports).items())),
            "transport_fallbacks": sum(1 for _, _, fallback in transports if fallback),
            "healthy": healthy,
            "reason": reason,
            "message": message,
        }

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)


def verdict(transfers: int, failed: int, recomputed: int,
            thresholds: HealthThresholds | None = None) -> tuple[bool, str, str]:
    """``(healthy, reason, message)`` for ``transfers`` in a window of which ``failed``
    failed and ``recomputed`` (failures included) fell back to recompute. Shared by a
    sidecar's summary and the operator, which sums the summaries of a pool's sidecars."""
    t = thresholds or HealthThresholds()
    failure_rate = failed / transfers if transfers else 0.0
    recompute_rate = recomputed / transfers if transfers else 0.0
    if transfers < t.min_transfers:
        return True, "Idle", (f"{transfers} transfers in the last {t.window_s:.0f} s: "
                              "too few to judge")
    if failure_rate > t.max_failure_rate:
        return False, "TransfersFailing", (f"{failed} of {transfers} transfers failed "
                                           f"(limit {t.max_failure_rate:.0%})")
    if recompute_rate > t.max_recompute_rate:
        return False, "FrequentRecompute", (f"{recomputed} of {transfers} requests fell back "
                                            f"to recompute (limit {t.max_recompute_rate:.0%})")
    return True, "TransfersSucceeding", f"{transfers - recomputed} of {transfers} transfers delivered"


def add_routes(app, health: TransferHealth) -> None:
    """Serve ``/transfer/health`` (JSON summary) and ``/metrics`` on an aiohttp app.

    ``/metrics`` is added only when the app has none yet (the sidecar may serve a larger
    registry that includes this one).
    """
    from aiohttp import web

    async def summary(_request: web.Request) -> web.Response:
        return web.json_response(health.summary())

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=health.metrics_text(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/transfer/health", summary)
    if not any(resource.canonical == "/metrics" for resource in app.router.resources()):
        app.router.add_get("/metrics", metrics)
