"""``kvpool bench transfer``: KV transport throughput and bandwidth adaptivity, one JSON object.

Three measurements, all on real KV of SmolLM2-135M (``kvpool.sidecar.realkv``):

- ``transfer``: for transports ``grpc`` (a gRPC chunk stream, :mod:`kvpool.sidecar.linkstream`)
  and ``nixl`` (decode pulls from prefill's registered memory), codecs ``raw`` and
  ``cachegen`` (the codec's ``default`` level), links ``loopback`` and ``link_1gbit`` (two
  network namespaces, tc tbf): KV delivered per second in fp16-equivalent GB/s and
  milliseconds to deliver a 4k-token KV (encode, wire and decode, pipelined by layer);
- ``nixl_vs_shm``: NIXL's READ of a 256 MiB buffer between two processes against a plain
  copy between two shared-memory buffers, measured in the same run;
- ``adaptive``: a link dropping from 1 Gbit/s to 100 Mbit/s mid-stream; for the adaptive
  policy and each fixed level, the fraction of chunks on time for a deadline and
  ``greedy_match``: of 32 greedy tokens generated from the raw KV, the fraction the model
  also picks (fed the same tokens) from the KV delivered at the levels chosen (a recompute
  is exact).

On ``link_1gbit`` each end runs in its own namespace: the gRPC ends under ``ip netns
exec``, the NIXL ends in processes that join their namespace before their agent starts,
with ``UCX_TLS=tcp`` and ``UCX_NET_DEVICES`` set to their end of the veth pair (so the
READs cross the shaped link, not shared memory). Parts that cannot run here (no network
namespaces) are null, with the reason under ``skipped``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import multiprocessing.shared_memory as shm
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from rich.console import Console

from kvpool.sidecar import netns

console = Console(stderr=True)
MiB = 1 << 20
CACHEGEN_LEVEL = "default"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the JSON object (always on)")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens of the KV moved")
    parser.add_argument("--shm-mib", type=int, default=256, help="buffer size for nixl_vs_shm")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--adaptive-tokens", type=int, default=1024)
    parser.add_argument("--skip-adaptive", action="store_true")
    parser.add_argument("--only-adaptive", action="store_true",
                        help="run only the changing-bandwidth part (adaptive vs fixed levels)")
    parser.add_argument("--adaptive-repeats", type=int, default=3, metavar="N",
                        help="runs of each policy (figures are means, with their spread; each "
                             "run is listed)")
    parser.add_argument("--deadline-scales", type=float, nargs="+", metavar="X",
                        help="run at the derived deadline times each X (default: 1.0; the "
                             "first is the one reported under `adaptive`)")
    parser.add_argument("--policies", nargs="+", metavar="POLICY",
                        help="policies of the adaptive part (default: adaptive, raw, every level)")


# ---- nixl_vs_shm -------------------------------------------------------------------------


def nixl_vs_shm(nbytes: int, repeats: int) -> dict:
    """NIXL READ of ``nbytes`` from another process's registered DRAM into ours, against a
    plain copy between two shared-memory buffers (pages touched beforehand), timed in
    alternation so that both see the same machine; the best of ``repeats`` each (this
    machine is shared: the best is what each can do, the median what the others left)."""
    from kvpool.sidecar.nixl_peer import SourceProcess
    from kvpool.sidecar.transport_nixl import NixlSink

    payload = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    a, b = shm.SharedMemory(create=True, size=nbytes), shm.SharedMemory(create=True, size=nbytes)
    try:
        src = np.ndarray(nbytes, np.uint8, a.buf)
        dst = np.ndarray(nbytes, np.uint8, b.buf)
        src[:] = payload
        dst[:] = 0
        shm_times, nixl_times = [], []
        with SourceProcess(slots=1, slot_bytes=nbytes) as source, \
                NixlSink(slots=1, slot_bytes=nbytes) as sink:
            sink.add_peer(source.metadata)
            source.store(payload.tobytes())
            for i in range(repeats + 1):
                loc = source.publish_stored(timeout=30)
                t0 = time.perf_counter()
                with sink.pulled(loc, timeout=60, verify=False) as view:
                    elapsed = time.perf_counter() - t0
                    if i == 0:  # warm-up; after timing: the bytes are the ones sent
                        assert np.array_equal(np.frombuffer(view, np.uint8), payload)
                        continue
                nixl_times.append(elapsed)
                t0 = time.perf_counter()
                np.copyto(dst, src)
                shm_times.append(time.perf_counter() - t0)
        assert np.array_equal(src, dst)
        del src, dst
    finally:
        for seg in (a, b):
            seg.close()
            seg.unlink()
    best = {"nixl": nbytes / min(nixl_times) / 1e9, "shm": nbytes / min(shm_times) / 1e9}
    median = {"nixl": nbytes / statistics.median(nixl_times) / 1e9,
              "shm": nbytes / statistics.median(shm_times) / 1e9}
    return {"nixl_read_gbps": best["nixl"], "shm_copy_gbps": best["shm"],
            "nixl_vs_shm": best["nixl"] / best["shm"],
            "nixl_vs_shm_median": median["nixl"] / median["shm"]}


# ---- transfer: grpc and nixl, raw and cachegen ---------------------------------------------


def _linkstream(prefix: list[str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "kvpool.sidecar.linkstream", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read(proc: subprocess.Popen, event: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"linkstream exited (rc={proc.wait(30)}) before {event!r}")
        msg = json.loads(line)
        if msg.get("event") == event:
            return msg


def _stop(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)


def grpc_stream(link: netns.Link | None, tokens: int, policy: str, deadline_s: float = 1e6,
                *, drop: tuple[int, str] | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One ``linkstream send`` run; returns its ``done`` report. ``drop=(n, rate)`` changes
    the link's rate after ``n`` chunks (the sender holds, its clock stopped, meanwhile)."""
    recv_prefix = link.exec_in("b") if link else []
    send_prefix = link.exec_in("a") if link else []
    host = link.address("b") if link else "127.0.0.1"
    receiver = _linkstream(recv_prefix, "serve", "--host", host)
    sender = None
    try:
        port = _read(receiver, "ready")["port"]
        sender = _linkstream(send_prefix, "send", "--target", f"{host}:{port}", "--tokens",
                             str(tokens), "--policy", policy, "--deadline", str(deadline_s),
                             "--wait", *extra, *(("--hold-after", str(drop[0])) if drop else ()))
        _read(sender, "ready")
        sender.stdin.write("go\n")
        sender.stdin.flush()
        seen = 0
        while True:
            msg = json.loads(sender.stdout.readline() or '{"event": "eof"}')
            if msg["event"] == "chunk":
                seen += 1
                if drop and seen == drop[0]:
                    link.set_rate(drop[1])
                    sender.stdin.write("go\n")
                    sender.stdin.flush()
            elif msg["event"] == "done":
                return msg
            else:
                raise RuntimeError(f"linkstream send failed (rc={sender.wait(30)})")
    finally:
        _stop(sender, receiver)


def nixl_stream(tokens: int, level: str, source_options: dict | None = None
                ) -> tuple[float, int]:
    """Seconds to deliver a ``tokens``-token KV through NIXL (the source encodes and
    publishes layer by layer; we pull and decode as they come), and its raw bytes.
    ``source_options``: more keyword arguments of the source's :class:`SourceProcess`."""
    from kvpool.sidecar import codec
    from kvpool.sidecar.nixl_peer import SourceProcess
    from kvpool.sidecar.transport_nixl import NixlSink

    with SourceProcess(slots=8, slot_bytes=8 * MiB, **(source_options or {})) as source, \
            NixlSink(slots=2, slot_bytes=8 * MiB) as sink:
        sink.add_peer(source.metadata)
        for loc, _ in source.stream_kv(256, level):  # warm-up: connection, codec
            codec.decode(sink.pull(loc), level)
        t0 = time.perf_counter()
        total = 0
        for loc, raw_bytes in source.stream_kv(tokens, level):
            codec.decode(sink.pull(loc), level)
            total += raw_bytes
        return time.perf_counter() - t0, total


def ucx_over(link: netns.Link, side: str) -> dict[str, str]:
    """UCX's environment for a NIXL end on ``side`` of ``link``: TCP only, on its veth."""
    return {"UCX_TLS": "tcp", "UCX_NET_DEVICES": link.devices[side]}


def _nixl_stream_in(namespace: str, env: dict[str, str], source_options: dict,
                    tokens: int, level: str) -> tuple[float, int]:
    """:func:`nixl_stream` run in a process of its own that first joins ``namespace``."""
    netns.enter(namespace)
    os.environ.update(env)
    return nixl_stream(tokens, level, source_options)


def nixl_stream_over(link: netns.Link, tokens: int, level: str) -> tuple[float, int]:
    """:func:`nixl_stream` across ``link``: the source in namespace ``a``, the reader in
    ``b``, each agent's UCX on TCP over its end of the veth pair."""
    source = {"netns": link.namespaces["a"], "env": ucx_over(link, "a")}
    context = multiprocessing.get_context("spawn")
    before = link.tx_bytes("a")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        seconds, raw = pool.submit(_nixl_stream_in, link.namespaces["b"], ucx_over(link, "b"),
                                   source, tokens, level).result(timeout=1800)
    console.print(f"  {(link.tx_bytes('a') - before) / 1e6:.1f} MB left namespace a over "
                  f"the link for {raw / 1e6:.1f} MB of raw KV (warm-up included)")
    return seconds, raw


def transfer_matrix(tokens: int, skipped: dict) -> dict:
    out: dict = {"grpc": {}, "nixl": {}}
    links = ["loopback", "link_1gbit"]
    reason = netns.unavailable()
    if reason:
        skipped["link_1gbit"] = reason
    for codec_name, level in (("raw", "raw"), ("cachegen", CACHEGEN_LEVEL)):
        for transport in ("grpc", "nixl"):
            out[transport].setdefault(codec_name, {})
            for link_name in links:
                cell = None
                console.print(f"[bold]transfer[/] {transport} {codec_name} {link_name}")
                if link_name == "link_1gbit" and reason:
                    pass
                elif transport == "grpc":
                    if link_name == "loopback":
                        done = grpc_stream(None, tokens, level)
                    else:
                        with netns.Link("1gbit") as link:
                            done = grpc_stream(link, tokens, level)
                    raw = sum(c["raw_bytes"] for c in done["chunks"])
                    cell = {"gbps": raw / done["finished_s"] / 1e9,
                            "ms_4k": done["finished_s"] * 1e3 * 4096 / tokens}
                else:
                    if link_name == "loopback":
                        seconds, raw = nixl_stream(tokens, level)
                    else:
                        with netns.Link("1gbit") as link:
                            seconds, raw = nixl_stream_over(link, tokens, level)
                    cell = {"gbps": raw / seconds / 1e9, "ms_4k": seconds * 1e3 * 4096 / tokens}
                out[transport][codec_name][link_name] = cell
    return out


# ---- adaptive ------------------------------------------------------------------------------


@functools.cache
def _harness(tokens: int, steps: int):
    """The prompt and its quality harness (the reference generation), made once per run."""
    from kvpool.kernels.quality import QualityHarness
    from kvpool.sidecar import realkv

    real = realkv.prompt(tokens)
    return real, QualityHarness(real, greedy_tokens=steps, ppl_tokens=1)


@functools.cache
def greedy_match(tokens: int, levels: tuple[str, ...], steps: int = 32) -> float:
    """Fraction of ``steps`` greedy tokens generated from the KV as delivered (each layer
    at its level; a recompute is exact) equal to those generated from the original KV
    (teacher-forced, as :class:`kvpool.kernels.quality.QualityHarness` measures it).
    The same levels give the same figure: measured once."""
    from kvpool import kernels
    from kvpool.sidecar import chunks, codec, linkstream

    if "recompute" in levels:
        return 1.0
    real, harness = _harness(tokens, steps)
    raws = linkstream.layer_chunks(real.kv.keys, real.kv.values)
    ks, vs = [], []
    for raw, level in zip(raws, list(levels) + ["raw"] * (len(raws) - len(levels))):
        back = codec.decode(codec.encode(raw, level), level)
        ks.append(chunks.from_bytes(back.keys, back.dtype, back.width))
        vs.append(chunks.from_bytes(back.values, back.dtype, back.width))
    return harness.measure(kernels.KVCache(keys=ks, values=vs)).greedy_match


DROP_AFTER = 6
"""Chunks sent at 1 Gbit/s before the link drops to 100 Mbit/s."""


def adaptive_deadline(tokens: int) -> float:
    """The changing-bandwidth run's deadline, the same for every policy: what a plan that
    knew the drop would need: raw at 1 Gbit/s up to it (x2), raw at 100 Mbit/s for the two
    chunks on their way when it drops, then the fastest codec level as this machine runs
    it now (median of 3 encodes: a busy machine's speed, not a quiet one's) at 100 Mbit/s
    (x1.3). Feasible for a policy that switches in time, not for raw."""
    from kvpool import kernels
    from kvpool.sidecar import adaptive, realkv

    keys, values = realkv.prompt_kv(tokens)
    sample = kernels.KVCache(keys=[keys[0]], values=[values[0]])
    model = adaptive.CodecModel.calibrate(lambda kv, lv: kernels.encode(kv, level=lv),
                                          kernels.decode, sample, kernels.LEVELS, repeats=3,
                                          statistic=statistics.median)
    chunk_bytes = adaptive.raw_size(sample)
    best = min(model.predict(lv, chunk_bytes, 12.5e6, {}, overlap=True) for lv in kernels.LEVELS)
    return (DROP_AFTER * chunk_bytes / 125e6 * 2 + 2 * chunk_bytes / 12.5e6
            + (len(keys) - DROP_AFTER - 2) * best * 1.3)


def adaptive_runs(tokens: int, skipped: dict, policies: list[str] | None = None,
                  repeats: int = 1, scales: list[float] | None = None) -> dict | None:
    """Every policy on the same link schedule, ``repeats`` times in turn (so that the
    machine's load hits each alike), for each deadline (the base one times each of
    ``scales``); ``{deadline_ms: {policy: summary}}``."""
    reason = netns.unavailable()
    if reason:
        skipped["adaptive"] = reason
        return None
    from kvpool.kernels import LEVELS

    base = adaptive_deadline(tokens)
    deadlines = [base * scale for scale in scales or [1.0]]
    runs: dict[float, dict[str, list[dict]]] = {d: {} for d in deadlines}
    for repeat in range(repeats):
        for deadline in deadlines:
            for policy in policies or ("adaptive", "raw", *LEVELS):
                console.print(f"[bold]adaptive[/] {policy} run {repeat + 1}/{repeats} "
                              f"(deadline {deadline * 1e3:.0f} ms)")
                got = runs[deadline].setdefault(policy, [])
                try:
                    with netns.Link("1gbit", latency_ms=20) as link:
                        extra = ("--initial-mbps", "1000") if policy == "adaptive" else ()
                        done = grpc_stream(link, tokens, policy, deadline,
                                           drop=(DROP_AFTER, "100mbit"), extra=extra)
                except RuntimeError as exc:
                    skipped[f"adaptive/{policy}"] = str(exc)
                    continue
                chunks = done["chunks"]
                got.append({
                    "on_time": done["on_time"], "met_deadline": done["met_deadline"],
                    "recompute": done["recompute"],
                    "finished_ms": done["finished_s"] * 1e3, "levels": done["levels"],
                    "greedy_match": greedy_match(tokens, tuple(done["levels"])),
                    # wall over CPU seconds of the encodings: 1 on an idle core
                    "encode_wall_per_cpu": (sum(c["encode_s"] for c in chunks)
                                            / max(sum(c["encode_cpu_s"] for c in chunks), 1e-9))})
    return {f"{d * 1e3:.0f}": {policy: _summary(got, d) for policy, got in by_policy.items()}
            for d, by_policy in runs.items()}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "stdev": statistics.pstdev(values),
            "min": min(values), "max": max(values)}


def _summary(runs: list[dict], deadline: float) -> dict | None:
    """Means over the runs of one policy (the figures), their spread, and every run's own."""
    if not runs:
        return None
    on_time = _spread([r["on_time"] for r in runs])
    greedy = _spread([r["greedy_match"] for r in runs])
    return {"on_time": on_time["mean"], "greedy_match": greedy["mean"],
            "on_time_spread": on_time, "greedy_match_min": greedy["min"],
            "deadline_ms": deadline * 1e3,
            "finished_ms": statistics.fmean(r["finished_ms"] for r in runs),
            "met_deadline": sum(r["met_deadline"] for r in runs) / len(runs),
            # runs given up to a recompute: their chunks not sent count as not on time
            "recompute": sum(r["recompute"] for r in runs) / len(runs),
            "encode_wall_per_cpu": statistics.fmean(r["encode_wall_per_cpu"] for r in runs),
            "runs": [{k: r[k] for k in ("on_time", "greedy_match", "finished_ms")} for r in runs],
            "levels": [r["levels"] for r in runs]}


def verdict(by_policy: dict, min_greedy: float = 0.95) -> dict | None:
    """Whether adaptive beats every fixed level on mean ``on_time`` at a mean
    ``greedy_match`` of at least ``min_greedy`` (the issue's target), and by how much."""
    mine = by_policy.get("adaptive")
    fixed = {p: s for p, s in by_policy.items() if p != "adaptive" and s}
    if not mine or not fixed:
        return None
    best = max(fixed, key=lambda p: fixed[p]["on_time"])
    return {"beats_every_fixed_level": (mine["greedy_match"] >= min_greedy and all(
                mine["on_time"] > s["on_time"] for s in fixed.values())),
            "best_fixed": best, "on_time_margin": mine["on_time"] - fixed[best]["on_time"]}


def _adaptive_part(args: argparse.Namespace, skipped: dict, result: dict) -> None:
    """``adaptive``: the figures at the first deadline; with several deadlines, each one's
    under ``adaptive_by_deadline``; the verdict of each; the load before and after."""
    result["load_before"] = os.getloadavg()
    by_deadline = adaptive_runs(args.adaptive_tokens, skipped, args.policies,
                                args.adaptive_repeats, args.deadline_scales)
    result["load_after"] = os.getloadavg()
    if by_deadline is None:
        result["adaptive"] = None
        return
    first = next(iter(by_deadline))
    result["adaptive"] = by_deadline[first]
    result["adaptive_verdict"] = {ms: verdict(got) for ms, got in by_deadline.items()}
    if len(by_deadline) > 1:
        result["adaptive_by_deadline"] = by_deadline


def run(args: argparse.Namespace) -> int:
    skipped: dict[str, str] = {}
    result: dict = {"tokens": args.tokens,
                    "note": "measured on a shared 2-core machine under load from other work"}
    if args.only_adaptive:
        _adaptive_part(args, skipped, result)
        result["skipped"] = skipped
        print(json.dumps(result))
        return 0
    console.print("[bold]nixl_vs_shm[/]")
    result.update(nixl_vs_shm(args.shm_mib * MiB, args.repeats))
    result["transfer"] = transfer_matrix(args.tokens, skipped)
    if args.skip_adaptive:
        result["adaptive"] = None
    else:
        _adaptive_part(args, skipped, result)
    result["skipped"] = skipped
    print(json.dumps(result))
    return 0
