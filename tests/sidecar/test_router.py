"""kvpool router in front of real vLLM CPU engines: both hops, streaming, round-robin,
failover from a dead decode worker, and a clear 503 when no worker of a role is left.

The engines here have no KV connector: prefill computes and drops the KV, decode
recomputes it. What is tested is the router: the same answers as one engine alone."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvpool.launch import HttpReady, Launcher, Process, free_port
from kvpool.models import DEFAULT_MODEL

PROMPT = "The three primary colors are"


def post(
    url: str, body: dict[str, Any] | bytes, timeout: float = 120
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sse_events(payload: bytes) -> list[Any]:
    events = []
    for line in payload.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def completion(max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with Launcher(tmp_path) as launcher:
        yield launcher


def start_router(
    launcher: Launcher, prefill: list[str], decode: list[str], name: str = "router"
) -> Process:
    router = launcher.start_router(
        name, prefill, decode, extra_args=["--health-interval", "0.5"], need_workers=False
    )
    launcher.wait_ready(router, timeout_s=60)
    return router


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _stand_in_worker(launcher: Launcher, folder: Path) -> Process:
    """A process whose /health answers 200 (a static file): a worker that looks up."""
    (folder / "www").mkdir(exist_ok=True)
    (folder / "www" / "health").write_text("ok")
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
            str(folder / "www"), str(port)]  # fmt: skip
    worker = launcher.start("stand-in", argv, ready=HttpReady(f"http://127.0.0.1:{port}/health"),
                            port=port)  # fmt: skip
    launcher.wait_ready(worker, timeout_s=30)
    return worker


def test_no_worker_left_is_a_clear_503(launcher: Launcher, tmp_path: Path) -> None:
    # no decode worker: refused before any prefill work is done
    router = start_router(launcher, [dead_url()], [dead_url()])
    status, headers, payload = post(router.url + "/v1/completions", completion())
    assert status == 503
    error = json.loads(payload)["error"]
    assert error["role"] == "decode" and error["code"] == 503
    assert "no decode worker is available" in error["message"]
    assert "Connect" in error["message"]
    assert headers.get("Retry-After") == "2"
    status, payload = get(router.url + "/health")
    assert status == 503 and json.loads(payload)["status"] == "unavailable"

    # a decode worker that looks up, but no prefill worker
    decode = _stand_in_worker(launcher, tmp_path)
    router = start_router(launcher, [dead_url()], [decode.url], name="router-2")
    status, _, payload = post(router.url + "/v1/completions", completion())
    error = json.loads(payload)["error"]
    assert status == 503 and error["role"] == "prefill"
    assert "no prefill worker is available" in error["message"]


def test_bad_input_is_a_400(launcher: Launcher) -> None:
    router = start_router(launcher, [dead_url()], [dead_url()])
    status, _, payload = post(router.url + "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]
    status, _, payload = post(router.url + "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(payload)["error"]["message"]


@pytest.mark.slow
def test_completion_matches_one_engine(
    launcher: Launcher, plain_engines: tuple[Process, Process]
) -> None:
    prefill, decode = plain_engines
    router = start_router(launcher, [prefill.url], [decode.url])
    _, _, direct = post(decode.url + "/v1/completions", completion())
    status, headers, routed = post(router.url + "/v1/completions", completion())
    assert status == 200
    assert json.loads(routed)["choices"][0]["text"] == json.loads(direct)["choices"][0]["text"]
    assert json.loads(routed)["usage"]["completion_tokens"] == 12
    assert headers["x-kvpool-prefill-worker"] == prefill.url
    assert headers["x-kvpool-decode-worker"] == decode.url
    assert float(headers["x-kvpool-prefill-ms"]) > 0

    # streaming: the same tokens, as server-sent events ending with [DONE]
    status, headers, payload = post(router.url + "/v1/completions", completion(stream=True))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert streamed == json.loads(direct)["choices"][0]["text"]

    # a worker's 4xx reaches the client unchanged
    status, _, payload = post(router.url + "/v1/completions", {"model": DEFAULT_MODEL})
    assert status == 400 and "error" in json.loads(payload)

    status, payload = get(router.url + "/metrics")
    text = payload.decode()
    assert 'kvpool_router_requests_total{endpoint="/v1/completions",status="200"} 2.0' in text
    assert "kvpool_router_ttft_seconds_count 2.0" in text


@pytest.mark.slow
def test_chat_completions_stream_and_not(
    launcher: Launcher, plain_engines: tuple[Process, Process]
) -> None:
    prefill, decode = plain_engines
    router = start_router(launcher, [prefill.url], [decode.url])
    chat = {
        "model": DEFAULT_MODEL,
        "max_tokens": 10,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Name a fruit."}],
    }
    _, _, direct = post(decode.url + "/v1/chat/completions", chat)
    status, _, routed = post(router.url + "/v1/chat/completions", chat)
    expected = json.loads(direct)["choices"][0]["message"]["content"]
    assert status == 200 and json.loads(routed)["choices"][0]["message"]["content"] == expected
    status, _, payload = post(
        router.url + "/v1/chat/completions",
        {**chat, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_events(payload)
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
    )
    assert status == 200 and text == expected
    assert events[-2]["usage"]["completion_tokens"] == 10


@pytest.mark.slow
def test_round_robin(launcher: Launcher, plain_engines: tuple[Process, Process]) -> None:
    urls = [e.url for e in plain_engines]
    router = start_router(launcher, urls, urls)
    seen = []
    for _ in range(4):
        status, headers, _ = post(router.url + "/v1/completions", completion(max_tokens=2))
        assert status == 200
        seen.append((headers["x-kvpool-prefill-worker"], headers["x-kvpool-decode-worker"]))
    assert [p for p, _ in seen] == [urls[0], urls[1], urls[0], urls[1]]
    assert [d for _, d in seen] == [urls[0], urls[1], urls[0], urls[1]]


@pytest.mark.slow
def test_dead_decode_worker_fails_over(
    launcher: Launcher, plain_engines: tuple[Process, Process], tmp_path: Path
) -> None:
    """A decode worker dies between two health probes: the router meets it on a request,
    marks it down, and the request completes on the next decode worker."""
    prefill, decode = plain_engines
    doomed = _stand_in_worker(launcher, tmp_path)  # looks up until it is killed
    router = launcher.start_router(
        "router", [prefill.url], [doomed.url, decode.url], extra_args=["--health-interval", "60"]
    )
    launcher.wait_ready(router, timeout_s=60)
    status, payload = get(router.url + "/health")
    assert status == 200 and all(w["up"] for w in json.loads(payload)["decode"])
    launcher.kill(doomed)

    for _ in range(3):
        status, headers, payload = post(router.url + "/v1/completions", completion(max_tokens=4))
        assert status == 200, payload
        assert headers["x-kvpool-decode-worker"] == decode.url
    status, payload = get(router.url + "/health")
    health = json.loads(payload)
    assert status == 200
    assert {w["url"]: w["up"] for w in health["decode"]} == {doomed.url: False, decode.url: True}
    _, metrics = get(router.url + "/metrics")
    text = metrics.decode()
    assert f'kvpool_router_worker_failures_total{{role="decode",worker="{doomed.url}"}} 1.0' in text
    assert f'kvpool_router_worker_up{{role="decode",worker="{doomed.url}"}} 0.0' in text


@pytest.mark.slow
def test_only_dead_decode_workers_is_a_503(
    launcher: Launcher, plain_engines: tuple[Process, Process]
) -> None:
    prefill, _ = plain_engines
    dead = dead_url()
    router = start_router(launcher, [prefill.url], [dead])
    status, _, payload = post(router.url + "/v1/completions", completion(stream=True))
    assert status == 503
    error = json.loads(payload)["error"]
    assert error["role"] == "decode" and error["workers"][0]["url"] == dead
    assert f"no decode worker is available: {dead}" in error["message"]
