"""Timed OpenAI completion calls and Prometheus scrapes, for ``kvpool demo`` and ``kvpool bench e2e``.

:func:`stream_completion` sends one streaming ``/v1/completions`` request and measures
time to first token (the first server-sent event that carries text) and total time;
:func:`scrape` reads a Prometheus endpoint into a dict so that two scrapes around a
request give what that request moved (:func:`delta`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Completion:
    """One answered completion request."""

    text: str
    ttft_s: float
    """From sending the request to the first event that carries text."""
    total_s: float
    headers: dict[str, str] = field(default_factory=dict)
    completion_tokens: int = 0


def stream_completion(
    base_url: str, body: dict[str, Any], *, timeout_s: float = 600.0
) -> Completion:
    """POST ``body`` with ``stream: true`` to ``base_url/v1/completions`` and time it."""
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(
        base_url.rstrip("/") + "/v1/completions",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    tokens = 0
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    parts.append(choice["text"])
            if event.get("usage"):
                tokens = int(event["usage"].get("completion_tokens", 0))
    total = time.perf_counter() - started
    return Completion("".join(parts), ttft if ttft is not None else total, total, headers, tokens)


def complete(base_url: str, body: dict[str, Any], *, timeout_s: float = 600.0) -> dict[str, Any]:
    """POST ``body`` (not streamed) to ``base_url/v1/completions``; the JSON answer."""
    request = urllib.request.Request(
        base_url.rstrip("/") + "/v1/completions",
        json.dumps({**body, "stream": False}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return dict(json.load(response))


def scrape(address: str, *, timeout_s: float = 10.0, wrap: Sequence[str] = ()) -> Samples:
    """Every sample of the Prometheus endpoint at ``host:port`` (or a full URL).

    ``wrap`` (``ip netns exec NS``): read it from inside a network namespace."""
    from prometheus_client.parser import text_string_to_metric_families

    url = address if address.startswith("http") else f"http://{address}/metrics"
    if wrap:
        fetch = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen({url!r}).read().decode())"
        text = subprocess.run([*wrap, sys.executable, "-c", fetch], capture_output=True,
                              text=True, check=True, timeout=timeout_s + 20).stdout  # fmt: skip
    else:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much the sample ``name{labels}`` grew between two scrapes (0 when absent)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)
