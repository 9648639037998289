"""OpenAI-compatible prefill/decode router (``kvpool router``).

Each ``/v1/completions`` or ``/v1/chat/completions`` request goes twice through vLLM, as
vLLM's own disaggregated-serving proxy does it:

1. to a **prefill** worker, as a copy with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={"do_remote_decode": true, ...}``: the worker computes the prompt's
   KV cache, its KV connector hands it to the transfer sidecar, and the response carries
   ``kv_transfer_params`` saying where the KV is;
2. to a **decode** worker, as the client's own request plus those ``kv_transfer_params``:
   its connector loads the KV and the worker generates; the router streams (SSE) or returns
   that response unchanged.

With ``--decode-sidecar`` (one peer address per decode worker) the decode worker is
picked first and the prefill request also carries ``kvpool_push_to``: its sidecar pushes
the KV to that decode sidecar while the prompt is computed, instead of decode pulling it
afterwards. If that decode worker then fails, the next one is told to pull
(``kvpool_push: false``) from the prefill sidecar, which holds the KV for its lease.

Workers are picked round-robin among the healthy ones. A worker is marked down when a
request to it fails to connect or answers 5xx, and a background task probes every
worker's ``/health`` to mark it up or down again. A failed worker is skipped for the next
one of its role (before any byte went to the client); when no worker of a role is left the
client gets a 503 whose JSON says which role and which workers failed. ``/health`` answers
200 only while at least one worker of each role is up; ``/metrics`` is Prometheus text.

Responses carry ``x-kvpool-prefill-worker``, ``x-kvpool-decode-worker`` and
``x-kvpool-prefill-ms`` headers (what the demo and the benchmark report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvpool.sidecar import vllm_args

log = logging.getLogger("kvpool.router")

PREFILL, DECODE = "prefill", "decode"

_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass(frozen=True)
class RouterSettings:
    """How the router talks to its workers."""

    health_interval_s: float = 2.0
    """Seconds between two ``/health`` probes of every worker (default 2: a dead worker is
    noticed within that time even when no request reaches it)."""

    health_timeout_s: float = 2.0
    """Seconds a ``/health`` probe may take before the worker counts as down."""

    connect_timeout_s: float = 5.0
    """Seconds to open a connection to a worker; a refused connection fails at once."""

    request_timeout_s: float = 600.0
    """Seconds a worker may stay silent during a request (long prompts on a CPU are slow)."""


@dataclass
class Worker:
    """One vLLM worker behind the router and what the router knows of its health."""

    url: str
    role: str
    sidecar: str = ""
    """Peer address of a decode worker's sidecar: prefill pushes the KV there as it is
    computed (``kvpool_push_to``). Empty: decode pulls it from prefill's sidecar."""
    up: bool = True
    """Optimistic at start: the first probe runs at once."""
    last_error: str = ""
    failures: int = 0


@dataclass
class WorkerPool:
    """The workers of one role, picked round-robin among those that are up."""

    role: str
    workers: list[Worker]
    _next: int = field(default=0, repr=False)

    @classmethod
    def of(cls, role: str, urls: Sequence[str], sidecars: Sequence[str] = ()) -> WorkerPool:
        if not urls:
            raise ValueError(f"the router needs at least one {role} worker")
        if sidecars and len(sidecars) != len(urls):
            raise ValueError(
                f"give one sidecar per {role} worker ({len(urls)}), not {len(sidecars)}"
            )
        peers = list(sidecars) or [""] * len(urls)
        return cls(role, [Worker(url.rstrip("/"), role, peer) for url, peer in zip(urls, peers)])

    def candidates(self) -> list[Worker]:
        """Workers that are up, in the order to try them (advances the round-robin)."""
        count = len(self.workers)
        start = self._next
        self._next = (self._next + 1) % count
        ordered = [self.workers[(start + i) % count] for i in range(count)]
        return [w for w in ordered if w.up]

    def any_up(self) -> bool:
        return any(w.up for w in self.workers)


class NoWorkerLeft(Exception):
    """Every worker of a role is down or failed for this request."""

    def __init__(self, role: str, tried: list[Worker], pool: WorkerPool) -> None:
        self.role, self.tried, self.pool = role, tried, pool
        super().__init__(f"no {role} worker is available")

    def response(self) -> web.Response:
        workers = [
            {"url": w.url, "up": w.up, "last_error": w.last_error} for w in self.pool.workers
        ]
        message = f"no {self.role} worker is available: " + ", ".join(
            f"{w.url} ({w.last_error or 'down'})" for w in self.pool.workers
        )
        body = {
            "error": {
                "message": message,
                "type": "ServiceUnavailable",
                "code": 503,
                "role": self.role,
                "workers": workers,
            }
        }
        return web.json_response(body, status=503, headers={"Retry-After": "2"})


class WorkerFailed(Exception):
    """A worker could not be reached or answered 5xx: try the next one."""


class RouterMetrics:
    """Prometheus metrics of one router (its own registry: several routers per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvpool_router_requests", "Client requests by endpoint and status code.",
            ["endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.worker_failures = Counter(
            "kvpool_router_worker_failures", "Failed calls to a worker (connection or 5xx).",
            ["role", "worker"], registry=self.registry,
        )  # fmt: skip
        self.worker_up = Gauge(
            "kvpool_router_worker_up", "1 when the worker is considered up.",
            ["role", "worker"], registry=self.registry,
        )  # fmt: skip
        self.prefill_seconds = Histogram(
            "kvpool_router_prefill_seconds", "Prefill request latency (max_tokens=1).",
            registry=self.registry,
        )  # fmt: skip
        self.ttft_seconds = Histogram(
            "kvpool_router_ttft_seconds",
            "From the client's request to the first byte of the decode worker's answer.",
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "kvpool_router_request_seconds", "Whole client request latency.",
            registry=self.registry,
        )  # fmt: skip


class Router:
    """The aiohttp application: routes, worker pools, health probes, metrics."""

    def __init__(
        self,
        prefill: Sequence[str],
        decode: Sequence[str],
        settings: RouterSettings | None = None,
        *,
        decode_sidecars: Sequence[str] = (),
    ) -> None:
        self.settings = settings or RouterSettings()
        self.pools = {
            PREFILL: WorkerPool.of(PREFILL, prefill),
            DECODE: WorkerPool.of(DECODE, decode, decode_sidecars),
        }
        self.metrics = RouterMetrics()
        self._session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics_page),
            ]
        )
        self.app.cleanup_ctx.append(self._lifetime)
        for pool in self.pools.values():
            for worker in pool.workers:
                self.metrics.worker_up.labels(worker.role, worker.url).set(1)

    # lifetime: one client session and the health probe task

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.settings.connect_timeout_s,
            sock_read=self.settings.request_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        probe = asyncio.create_task(self._probe_forever())
        try:
            yield
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the router application is not running")
        return self._session

    async def _probe_forever(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.settings.health_interval_s)

    async def probe_all(self) -> None:
        """Probe every worker's ``/health`` once, concurrently."""
        workers = [w for pool in self.pools.values() for w in pool.workers]
        await asyncio.gather(*(self._probe(w) for w in workers))

    async def _probe(self, worker: Worker) -> None:
        try:
            async with self.session.get(
                worker.url + "/health",
                timeout=aiohttp.ClientTimeout(total=self.settings.health_timeout_s),
            ) as response:
                healthy = response.status == 200
                error = "" if healthy else f"/health answered {response.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            healthy, error = False, f"/health failed: {_describe(exc)}"
        if healthy:
            self._mark_up(worker)
        else:
            self._mark_down(worker, error, count=False)

    def _mark_up(self, worker: Worker) -> None:
        if not worker.up:
            log.info("%s worker %s is up again", worker.role, worker.url)
        worker.up, worker.last_error = True, ""
        self.metrics.worker_up.labels(worker.role, worker.url).set(1)

    def _mark_down(self, worker: Worker, error: str, *, count: bool = True) -> None:
        if worker.up:
            log.warning("%s worker %s is down: %s", worker.role, worker.url, error)
        worker.up, worker.last_error = False, error
        self.metrics.worker_up.labels(worker.role, worker.url).set(0)
        if count:
            worker.failures += 1
            self.metrics.worker_failures.labels(worker.role, worker.url).inc()

    # the two hops

    async def completions(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = request.path
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._count(endpoint, _error(400, "the request body is not valid JSON"))
        if not isinstance(body, dict):
            return self._count(endpoint, _error(400, "the request body must be a JSON object"))
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"X-Request-Id": request_id}
        if "authorization" in request.headers:
            headers["Authorization"] = request.headers["authorization"]

        # The decode worker is picked first: prefill may push the KV to its sidecar.
        decode_order = self.pools[DECODE].candidates()
        if not decode_order:
            return self._count(endpoint, NoWorkerLeft(DECODE, [], self.pools[DECODE]).response())
        try:
            prefill_worker, prefill_reply, prefill_ms = await self._prefill(
                endpoint, body, headers, decode_order[0].sidecar
            )
        except NoWorkerLeft as exc:
            return self._count(endpoint, exc.response())
        except _ClientError as exc:
            return self._count(endpoint, exc.response)

        decode_body = dict(body)
        kv_params = prefill_reply.get("kv_transfer_params")
        if kv_params:
            decode_body["kv_transfer_params"] = kv_params
        trace = {
            "x-kvpool-prefill-worker": prefill_worker.url,
            "x-kvpool-prefill-ms": f"{prefill_ms:.1f}",
            "x-request-id": request_id,
        }
        try:
            response = await self._decode(
                request, endpoint, decode_body, decode_order, headers, trace, started
            )
        except NoWorkerLeft as exc:
            return self._count(endpoint, exc.response())
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        return self._count(endpoint, response)

    async def _prefill(
        self, endpoint: str, body: dict[str, Any], headers: dict[str, str], push_to: str
    ) -> tuple[Worker, dict[str, Any], float]:
        kv_params = vllm_args.prefill_params(push_to=push_to)
        prefill_body = copy.deepcopy(body)
        prefill_body.update(max_tokens=1, stream=False, kv_transfer_params=kv_params)
        if "max_completion_tokens" in prefill_body:
            prefill_body["max_completion_tokens"] = 1
        prefill_body.pop("stream_options", None)
        pool = self.pools[PREFILL]
        tried: list[Worker] = []
        for worker in pool.candidates():
            tried.append(worker)
            started = time.perf_counter()
            try:
                async with self.session.post(
                    worker.url + endpoint, json=prefill_body, headers=headers
                ) as response:
                    payload = await response.read()
                    if response.status >= 500:
                        raise WorkerFailed(f"answered {response.status}: {_snippet(payload)}")
                    if response.status >= 400:  # the client's mistake: same on every worker
                        raise _ClientError(_passthrough(response, payload))
            except (TimeoutError, aiohttp.ClientError, WorkerFailed) as exc:
                self._mark_down(worker, _describe(exc))
                continue
            elapsed = time.perf_counter() - started
            self.metrics.prefill_seconds.observe(elapsed)
            try:
                reply = json.loads(payload)
            except json.JSONDecodeError:
                reply = {}
            return worker, reply if isinstance(reply, dict) else {}, elapsed * 1000
        raise NoWorkerLeft(PREFILL, tried, pool)

    async def _decode(
        self,
        request: web.Request,
        endpoint: str,
        body: dict[str, Any],
        order: list[Worker],
        headers: dict[str, str],
        trace: dict[str, str],
        started: float,
    ) -> web.StreamResponse:
        pool = self.pools[DECODE]
        tried: list[Worker] = []
        kv_params = body.get("kv_transfer_params")
        for worker in order:
            if not worker.up:  # marked down meanwhile
                continue
            tried.append(worker)
            worker_body = body
            if (
                worker is not order[0]
                and isinstance(kv_params, dict)
                and kv_params.get("kvpool_push")
            ):
                # the KV was pushed to another decode sidecar: this one pulls it from prefill's
                worker_body = {**body, "kv_transfer_params": {**kv_params, "kvpool_push": False}}
            try:
                upstream = await self.session.post(
                    worker.url + endpoint, json=worker_body, headers=headers
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                self._mark_down(worker, _describe(exc))
                continue
            async with upstream:
                if upstream.status >= 500:
                    payload = await upstream.read()
                    self._mark_down(worker, f"answered {upstream.status}: {_snippet(payload)}")
                    continue
                trace = {**trace, "x-kvpool-decode-worker": worker.url}
                return await self._relay(request, upstream, trace, started)
        raise NoWorkerLeft(DECODE, tried, pool)

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        trace: dict[str, str],
        started: float,
    ) -> web.StreamResponse:
        """Send the decode worker's answer on as it arrives (SSE streams chunk by chunk)."""
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        headers.update(trace)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        first = True
        async for chunk in upstream.content.iter_any():
            if first:
                self.metrics.ttft_seconds.observe(time.perf_counter() - started)
                await response.prepare(request)
                first = False
            await response.write(chunk)
        if first:
            await response.prepare(request)
        await response.write_eof()
        return response

    # the other routes

    async def models(self, request: web.Request) -> web.StreamResponse:
        pool = self.pools[DECODE]
        for worker in pool.candidates():
            try:
                async with self.session.get(worker.url + "/v1/models") as upstream:
                    payload = await upstream.read()
                    if upstream.status < 500:
                        return _passthrough(upstream, payload)
                    self._mark_down(worker, f"answered {upstream.status}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                self._mark_down(worker, _describe(exc))
        return NoWorkerLeft(DECODE, [], pool).response()

    async def health(self, request: web.Request) -> web.Response:
        roles = {
            role: [{"url": w.url, "up": w.up, "last_error": w.last_error} for w in pool.workers]
            for role, pool in self.pools.items()
        }
        ok = all(pool.any_up() for pool in self.pools.values())
        return web.json_response({"status": "ok" if ok else "unavailable", **roles},
                                 status=200 if ok else 503)  # fmt: skip

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    def _count(self, endpoint: str, response: web.StreamResponse) -> web.StreamResponse:
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        return response


class _ClientError(Exception):
    """A 4xx from a worker: returned to the client as it is."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _passthrough(upstream: aiohttp.ClientResponse, payload: bytes) -> web.Response:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
    return web.Response(status=upstream.status, body=payload, headers=headers)


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequest", "code": status}}
    return web.json_response(body, status=status)


def _snippet(payload: bytes, limit: int = 200) -> str:
    return payload[:limit].decode(errors="replace").strip()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- the command -------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill",
        nargs="+",
        required=True,
        metavar="URL",
        help="base URL of each prefill vLLM server (http://host:port)",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        required=True,
        metavar="URL",
        help="base URL of each decode vLLM server",
    )
    parser.add_argument(
        "--decode-sidecar",
        nargs="+",
        default=[],
        metavar="HOST:PORT",
        help="peer address of each decode worker's sidecar, in --decode order: "
        "prefill then pushes the KV there while it computes it",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--health-interval",
        type=float,
        default=RouterSettings.health_interval_s,
        help="seconds between worker health probes",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=RouterSettings.request_timeout_s,
        help="seconds a worker may stay silent during a request",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for url in [*args.prefill, *args.decode]:
        if not url.startswith(("http://", "https://")):
            raise SystemExit(
                f"kvpool router: worker URL {url!r} must start with http:// or https://"
            )
    settings = RouterSettings(
        health_interval_s=args.health_interval, request_timeout_s=args.request_timeout
    )
    try:
        router = Router(args.prefill, args.decode, settings, decode_sidecars=args.decode_sidecar)
    except ValueError as exc:
        raise SystemExit(f"kvpool router: {exc}") from exc
    log.info(
        "routing prefill=%s decode=%s on http://%s:%d",
        args.prefill,
        args.decode,
        args.host,
        args.port,
    )
    web.run_app(router.app, host=args.host, port=args.port, print=None, access_log=None)
    return 0
