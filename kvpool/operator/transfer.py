"""A pool's transfer health, read from its sidecars' ``/transfer/health`` and summed.

Every ``transfer_health_interval_s`` (a kopf timer per pool,
:func:`kvpool.operator.handlers.transfer_health`) the operator lists the pool's running
worker pods, asks every sidecar for its summary at once (HTTP to the pod IP and the
sidecar container's ``metrics`` port, each within ``transfer_health_timeout_s``) and
sums the answers into a :class:`TransferVerdict`:

- the ``TransferHealthy`` condition: ``True``/``False`` with the reason of
  :func:`kvpool.sidecar.health.verdict` over the summed counts, ``Unknown`` when no
  sidecar answered (``SidecarsUnreachable``), none is ready (``NoReadySidecars``) or
  nothing was measured yet (``NotMeasured``);
- ``status.transfer``: bytes saved by compression, transfers, failures (by reason) and
  recomputes over the sidecars' window, the transports transfers took and how often a
  preferred NIXL fell back to gRPC, and how many sidecars answered.

A sidecar that does not answer costs its timeout and nothing else: the timer runs beside
the reconcile handlers, never inside them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp

from kvpool.operator import api, children
from kvpool.sidecar import health

CONDITION = "TransferHealthy"
UNREACHABLE = "SidecarsUnreachable"
NO_READY = "NoReadySidecars"
NOT_MEASURED = "NotMeasured"
_COUNTS = ("transfers", "failed", "recomputed", "raw_bytes", "wire_bytes", "bytes_saved")


@dataclasses.dataclass(frozen=True)
class TransferVerdict:
    """What the operator writes about a pool's transfers."""

    status: str
    """``True``, ``False`` or ``Unknown``."""
    reason: str
    message: str
    summary: Mapping[str, Any] | None = None
    """``status.transfer`` (None: keep out of status)."""

    @classmethod
    def unknown(cls, reason: str, message: str) -> TransferVerdict:
        return cls("Unknown", reason, message)

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> TransferVerdict | None:
        """The verdict a pool's status holds (written by an earlier operator), if any."""
        for cond in status.get("conditions", []):
            if cond.get("type") == CONDITION:
                return cls(cond.get("status", "Unknown"), cond.get("reason", ""),
                           cond.get("message", ""), status.get("transfer"))
        return None


def targets(pods: Iterable[Mapping[str, Any]], pool: str) -> dict[str, str]:
    """``/transfer/health`` URL of every running worker pod of ``pool``, by pod name."""
    out = {}
    for pod in pods:
        labels = pod.get("metadata", {}).get("labels", {})
        if labels.get(children.POOL_LABEL) != pool or \
                labels.get(children.ROLE_LABEL) not in api.ROLES:
            continue
        ip = pod.get("status", {}).get("podIP")
        if pod.get("status", {}).get("phase") != "Running" or not ip:
            continue
        port = next((p.get("containerPort")
                     for c in pod.get("spec", {}).get("containers", []) if c.get("name") == "sidecar"
                     for p in c.get("ports", []) if p.get("name") == "metrics"), None)
        if port:
            host = f"[{ip}]" if ":" in ip else ip
            out[pod["metadata"]["name"]] = f"http://{host}:{port}/transfer/health"
    return out


async def fetch(session: aiohttp.ClientSession, url: str, timeout_s: float) -> dict | None:
    """One sidecar's summary, or None when it does not answer in time or answers nonsense."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as reply:
            if reply.status != 200:
                return None
            summary = await reply.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    try:
        for name in _COUNTS:
            int(summary[name])
        float(summary["window_s"])
    except (KeyError, TypeError, ValueError):
        return None
    return summary


def _count(x: Any) -> int:
    """A non-negative count from a summary (0 for what an older sidecar does not send)."""
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else 0


def _sum_maps(maps: Iterable[Any]) -> dict[str, int]:
    """Counts by name, summed over the sidecars' summaries."""
    out: dict[str, int] = {}
    for m in maps:
        for name, n in (m.items() if isinstance(m, dict) else ()):
            out[str(name)] = out.get(str(name), 0) + _count(n)
    return dict(sorted(out.items()))


def aggregate(answers: Mapping[str, dict | None]) -> TransferVerdict:
    """The pool's verdict from each pod's summary (None: the pod did not answer)."""
    got = [a for a in answers.values() if a is not None]
    if not answers:
        return TransferVerdict.unknown(NO_READY, "no worker pod is running")
    if not got:
        return TransferVerdict.unknown(
            UNREACHABLE, f"none of {len(answers)} sidecars answered /transfer/health")
    sums = {name: sum(int(a[name]) for a in got) for name in _COUNTS}
    window = max(float(a["window_s"]) for a in got)
    healthy, reason, message = health.verdict(
        sums["transfers"], sums["failed"], sums["recomputed"],
        health.HealthThresholds(window_s=window))
    if len(got) < len(answers):
        silent = sorted(name for name, a in answers.items() if a is None)
        message += f"; {len(got)} of {len(answers)} sidecars answered (not: {', '.join(silent)})"
    summary = {
        "failureReasons": _sum_maps(a.get("failure_reasons") for a in got),
        "transports": _sum_maps(a.get("transports") for a in got),
        "transportFallbacks": sum(_count(a.get("transport_fallbacks")) for a in got),
        "bytesSaved": sums["bytes_saved"],
        "rawBytes": sums["raw_bytes"],
        "wireBytes": sums["wire_bytes"],
        "transfers": sums["transfers"],
        "failed": sums["failed"],
        "recomputed": sums["recomputed"],
        "windowSeconds": int(window),
        "sidecars": f"{len(got)}/{len(answers)}",
    }
    return TransferVerdict("True" if healthy else "False", reason, message, summary)


async def collect(list_pods: Callable[[], list[dict[str, Any]]], pool: str,
                  timeout_s: float) -> TransferVerdict:
    """List the pool's pods (``list_pods`` blocks: it runs in a thread), read every
    sidecar at once, and sum."""
    urls = targets(await asyncio.to_thread(list_pods), pool)
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(fetch(session, u, timeout_s) for u in urls.values()))
    return aggregate(dict(zip(urls, answers, strict=True)))
