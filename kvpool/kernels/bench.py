"""``kvpool bench codec``: the codec's ratio, quality and speed on a real model's KV cache.

The KV cache of ``--tokens`` tokens of real text (2048 by default) is cut into chunks of
256, 1024 and 2048 tokens; every chunk is encoded and decoded at every level, once with the
model profile (the chunk carries no probability tables) and once without (it carries its
own), and the decoded cache is measured against the original with
:mod:`kvpool.kernels.quality`. The baselines (per-token int8 and int4, zstd level 3 on the
fp16 bytes) go through the same steps in the same run.

The profile is built from a different stretch of the same text (the tokens after the ones
measured), or loaded with ``--profile``. Speeds are fp16-equivalent MB/s (10^6 bytes of the
KV cache as 16-bit values per second), best of ``--repeat`` runs, with ``--threads`` codec
threads (1 by default: the per-core figure); ``gpu_*`` keys are added when CUDA is present.

Prints one JSON object on stdout (``--json``; otherwise a table), progress on stderr, and
with ``--plot`` a PNG of ratio against quality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvpool import models
from kvpool.kernels import LEVELS, KVCache, Profile, decode, encode
from kvpool.kernels.baselines import BASELINES, Baseline
from kvpool.kernels.chunks import concat, split
from kvpool.kernels.quality import Quality, QualityHarness
from kvpool.kernels.realkv import RealKV, extract, load_model

DEFAULT_CHUNKS = (256, 1024, 2048)
GREEDY_TOKENS = 64
PPL_TOKENS = 256


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--plot", metavar="PNG", help="write a plot of ratio vs quality")
    parser.add_argument(
        "--model", default=models.DEFAULT_MODEL, help="GGUF file of a decoder (default %(default)s)"
    )
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text (default: pydoc_data.topics)")
    parser.add_argument(
        "--tokens", type=int, default=2048, help="prompt tokens (default %(default)s)"
    )
    parser.add_argument(
        "--chunks",
        type=_int_list,
        default=DEFAULT_CHUNKS,
        metavar="N,N,…",
        help="chunk sizes in tokens (default 256,1024,2048)",
    )
    parser.add_argument(
        "--levels", type=_name_list, default=LEVELS, metavar="L,L,…", help="levels (default all)"
    )
    parser.add_argument("--profile", metavar="FILE", help="use this saved profile (kvpool profile)")
    parser.add_argument(
        "--threads", type=int, default=1, help="codec threads (default 1: per core)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads for the model (default 1: on a busy machine more threads are slower)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timing runs, best kept (default 3)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive integers expected: {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(x for x in text.split(",") if x)
    unknown = [n for n in names if n not in LEVELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown level(s) {unknown}; known: {', '.join(LEVELS)}")
    return names


@dataclass
class Timing:
    encode_s: float
    decode_s: float


def _best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _digest(kv: KVCache) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in (*kv.keys, *kv.values):
        t = torch.as_tensor(t).cpu().contiguous()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Bench:
    """One benchmark run: a real KV cache, its quality harness, and the rows measured."""

    def __init__(self, args: argparse.Namespace, real: RealKV) -> None:
        self.args = args
        self.real = real
        self.harness = QualityHarness(real, greedy_tokens=GREEDY_TOKENS, ppl_tokens=PPL_TOKENS)
        self.reference = _digest(real.kv)
        self._quality: dict[str, tuple[Quality, bool]] = {}
        self.cuda = torch.cuda.is_available()

    def quality(self, kv: KVCache) -> tuple[Quality, bool]:
        """Quality of a decoded cache and whether it is bit-exact (memoized by content)."""
        key = _digest(kv)
        if key not in self._quality:
            if key == self.reference:  # the same bits give the same model outputs
                ref = self.harness.reference_ppl
                self._quality[key] = (Quality(1.0, 1.0, ref, 0.0, 0.0), True)
            else:
                self._quality[key] = (self.harness.measure(kv), False)
        return self._quality[key]

    def _row(
        self,
        chunk: int,
        level: str,
        profile: bool,
        size: int,
        timing: Timing,
        decoded: KVCache,
        gpu: Timing | None,
    ) -> dict[str, Any]:
        raw = self.real.fp16_bytes
        q, exact = self.quality(decoded)
        row: dict[str, Any] = {
            "chunk_tokens": chunk,
            "level": level,
            "profile": profile,
            "ratio_vs_fp16": round(raw / size, 3),
            "greedy_match": round(q.greedy_match, 4),
            "greedy_prefix": round(q.greedy_prefix, 4),
            "ppl_delta_pct": round(q.ppl_delta_pct, 3),
            "kl": round(q.kl, 5),
            "bit_exact": exact,
            "encoded_bytes": size,
            "encode_mb_s": round(raw / timing.encode_s / 1e6, 1),
            "decode_mb_s": round(raw / timing.decode_s / 1e6, 1),
        }
        if gpu is not None:
            row["gpu_encode_mb_s"] = round(raw / gpu.encode_s / 1e6, 1)
            row["gpu_decode_mb_s"] = round(raw / gpu.decode_s / 1e6, 1)
        return row

    def codec_row(self, chunk: int, level: str, profile: Profile | None) -> dict[str, Any]:
        """One level at one chunk size, with ``profile`` (no tables in the chunks) or without."""
        parts = split(self.real.kv, chunk)
        threads, repeat = self.args.threads, self.args.repeat
        enc_s, blobs = _best_of(
            repeat,
            lambda: [encode(p, level, profile, threads=threads, position=i * chunk)
                     for i, p in enumerate(parts)],
        )
        dec_s, out = _best_of(repeat, lambda: [decode(b, profile, threads=threads) for b in blobs])
        gpu = self._gpu_timing(parts, chunk, level, profile) if self.cuda else None
        return self._row(
            chunk,
            level,
            profile is not None,
            sum(len(b) for b in blobs),
            Timing(enc_s, dec_s),
            concat(out),
            gpu,
        )

    def _gpu_timing(
        self, parts: list[KVCache], chunk: int, level: str, profile: Profile | None
    ) -> Timing:
        on_gpu = [KVCache([k.cuda() for k in p.keys], [v.cuda() for v in p.values]) for p in parts]
        repeat = self.args.repeat

        def enc() -> list[bytes]:
            return [encode(p, level, profile, position=i * chunk) for i, p in enumerate(on_gpu)]

        blobs = enc()

        def dec() -> list[KVCache]:
            out = [decode(b, profile, device="cuda") for b in blobs]
            torch.cuda.synchronize()
            return out

        enc_s, _ = _best_of(repeat, enc)
        dec_s, _ = _best_of(repeat, dec)
        return Timing(enc_s, dec_s)

    def baseline_row(self, chunk: int, baseline: Baseline) -> dict[str, Any]:
        parts = split(self.real.kv, chunk)
        repeat = self.args.repeat
        enc_s, blobs = _best_of(repeat, lambda: [baseline.encode(p) for p in parts])
        dec_s, out = _best_of(repeat, lambda: [baseline.decode(b) for b in blobs])
        size = sum(len(b) for b in blobs)
        return self._row(chunk, baseline.name, False, size, Timing(enc_s, dec_s), concat(out), None)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _load_profile(args: argparse.Namespace, lm: Any, progress: Progress) -> Profile:
    if args.profile:
        return Profile.load(args.profile)
    from kvpool.kernels.profile_cli import build_profile

    task = progress.add_task("profile from held-out text", total=1)
    profile = build_profile(
        lm, text=args.text, tokens=args.tokens, offset=args.tokens + PPL_TOKENS + 1
    )
    progress.advance(task)
    return profile


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; return the JSON-ready result."""
    torch.set_num_threads(max(1, args.torch_threads))
    chunks = [c for c in args.chunks if c <= args.tokens]
    if not chunks:
        raise SystemExit(f"kvpool bench codec: every chunk size exceeds --tokens {args.tokens}")
    with _progress() as progress:
        task = progress.add_task(f"KV of {args.tokens} tokens", total=1)
        lm = load_model(args.model)
        real = extract(lm, text=args.text, tokens=args.tokens, next_tokens=PPL_TOKENS + 1)
        progress.advance(task)
        profile = _load_profile(args, lm, progress)
        task = progress.add_task("reference continuation", total=1)
        bench = Bench(args, real)
        progress.advance(task)

        rows, baselines = [], []
        task = progress.add_task("levels", total=2 * len(chunks) * len(args.levels))
        for chunk in chunks:
            for level in args.levels:
                for with_profile in (profile, None):
                    how = "with" if with_profile else "without"
                    progress.update(task, description=f"{level} @ {chunk} tokens, {how} profile")
                    rows.append(bench.codec_row(chunk, level, with_profile))
                    progress.advance(task)
        task = progress.add_task("baselines", total=len(chunks) * len(BASELINES))
        for chunk in chunks:
            for baseline in BASELINES:
                progress.update(task, description=f"{baseline.name} @ {chunk} tokens")
                baselines.append(bench.baseline_row(chunk, baseline))
                progress.advance(task)

    return {
        "model": lm.name,
        "tokens": real.tokens,
        "text": args.text or "pydoc_data.topics",
        "layers": len(real.kv.keys),
        "fp16_bytes": real.fp16_bytes,
        "reference_ppl": round(bench.harness.reference_ppl, 4),
        "greedy_tokens": GREEDY_TOKENS,
        "ppl_tokens": PPL_TOKENS,
        "profile": {"hash": profile.hash, "model": profile.model, "bytes": _profile_bytes(profile)},
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows,
        "baselines": baselines,
    }


def _profile_bytes(profile: Profile) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "profile")
        profile.save(path)
        return os.path.getsize(path)


def _color(row: dict[str, Any], baselines: list[dict[str, Any]]) -> str:
    if row in baselines:
        return "tab:gray"
    return "tab:blue" if row["profile"] else "tab:orange"


def plot(result: dict[str, Any], path: str) -> None:
    """Ratio vs quality (perplexity change, KL divergence, greedy match) for every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    chunks = sorted({r["chunk_tokens"] for r in result["rows"] + result["baselines"]})
    markers = dict(zip(chunks, "osD^v"))
    for ax, key, label in (
        (axes[0], "ppl_delta_pct", "perplexity change (%)"),
        (axes[1], "kl", "KL divergence of next-token distributions (nats)"),
        (axes[2], "greedy_match", "greedy match (64 tokens)"),
    ):
        for row in result["rows"] + result["baselines"]:
            x, y = row["ratio_vs_fp16"], row[key]
            marker = markers[row["chunk_tokens"]]
            ax.scatter(x, y, color=_color(row, result["baselines"]), marker=marker)
            ax.annotate(row["level"], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("compression ratio vs fp16")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], linestyle="", marker=markers[c], color="k", label=f"{c}-token chunks")
        for c in chunks
    ]
    handles += [
        plt.Line2D([], [], linestyle="", marker="o", color=c, label=n)
        for c, n in (
            ("tab:blue", "codec, model profile"),
            ("tab:orange", "codec, tables in each chunk"),
            ("tab:gray", "baselines"),
        )
    ]
    axes[2].legend(handles=handles, fontsize=8)
    fig.suptitle(f"{result['model']}: {result['tokens']} tokens of {result['text']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(result: dict[str, Any]) -> Table:
    keys = (
        "chunk_tokens",
        "level",
        "profile",
        "ratio_vs_fp16",
        "greedy_match",
        "ppl_delta_pct",
        "encode_mb_s",
        "decode_mb_s",
    )
    table = Table(title=f"{result['model']}, {result['tokens']} tokens")
    for key in keys:
        table.add_column(key, justify="right")
    for row in result["rows"] + result["baselines"]:
        table.add_row(*(str(row[k]) for k in keys))
    return table


def run(args: argparse.Namespace) -> int:
    try:
        result = measure(args)
    except (models.ModelNotFound, ValueError) as exc:
        print(f"kvpool bench codec: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        plot(result, args.plot)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        Console().print(_table(result))
    return 0
