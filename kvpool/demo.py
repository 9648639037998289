"""``kvpool demo``: disaggregated prefill/decode on this machine's CPU, end to end.

Starts two transfer sidecars, a prefill and a decode vLLM engine (SmolLM2-135M, each with
kvpool's KV connector) and the router, shows their start-up as it happens, then sends a
few real prompts through the router. For each it prints the time to first token, the KV
bytes the prefill sidecar produced raw and put on the wire (codec level), whether decode
loaded the KV or had to recompute it, and whether the answer matches the one a single
engine gives for the same prompt (greedy decoding). Every process it started is stopped
at the end, also on Ctrl-C; their logs stay in the work folder it names.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvpool import launch, models
from kvpool.sidecar import completions, vllm_args

PROMPTS: tuple[str, ...] = (
    "The sky looks blue on a clear day because",
    "Autumn leaves change colour when",
    "Three everyday uses of a paperclip are",
)
"""Short prompts; one more built from the model's sample text gives a long prompt."""


@dataclass
class Outcome:
    prompt: str
    prompt_tokens: int
    ttft_s: float
    prefill_ms: float
    raw_bytes: float
    wire_bytes: float
    loaded: bool
    text: str
    reference: str

    @property
    def matches(self) -> bool:
        return self.text == self.reference

    def same_words(self) -> str:
        """How many leading words agree with the single engine's answer, as ``n/m``."""
        ours, theirs = self.text.split(), self.reference.split()
        same = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
        )
        return f"{same}/{len(theirs)} words"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--level",
        default=None,
        help="KV codec level of the transfer (raw, lossless, default, ...); "
        "default: the codec's 'default' level when it is built, else raw",
    )
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens to generate per prompt")
    parser.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=1000,
        help="about this many tokens in the long prompt (0: none)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for logs and sockets (default: a new temporary folder)",
    )
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds the processes may take to become ready")  # fmt: skip
    launch.add_profile_option(parser)


def _default_level() -> str:
    from kvpool.sidecar import codec

    levels = codec.levels()
    return "default" if "default" in levels else levels[0]


def _prompts(long_tokens: int) -> list[str]:
    prompts = list(PROMPTS)
    if long_tokens > 0:
        words = models.sample_text().split()
        # about 1.3 tokens per English word for this tokenizer
        text = " ".join(words[: int(long_tokens / 1.3)])
        prompts.append(text + "\n\nSummarize the text above in one sentence:")
    return prompts


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    started = time.monotonic()
    try:
        model = models.model_dir(progress=True)
    except models.ModelNotFound as exc:
        console.print(f"[red]kvpool demo: {exc}[/]")
        return 2
    level = args.level or _default_level()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvpool-demo-"))
    console.print(f"[bold]kvpool demo[/]: prefill + decode vLLM on the CPU, KV level [cyan]{level}[/],"
                  f" logs in {workdir}")  # fmt: skip
    if level == "raw":
        console.print("[yellow]the codec extension is not built here: the KV travels raw "
                      "(make kernels builds it)[/]")  # fmt: skip

    with Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(bar_width=None),
                  TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console,
                  transient=False) as progress:  # fmt: skip
        tasks: dict[str, int] = {}

        def on_event(name: str, state: str, detail: str) -> None:
            if state == "starting":
                tasks[name] = progress.add_task(name, total=1, state="starting")
            elif name in tasks:
                done = state in ("ready", "stopped", "failed")
                style = {"ready": "green", "failed": "red"}.get(state, "dim")
                progress.update(tasks[name], completed=1 if done else 0,
                                state=f"[{style}]{state} {detail}[/]")  # fmt: skip
                if state == "ready":
                    progress.stop_task(tasks[name])

        with launch.Launcher(workdir, on_event=on_event) as launcher:
            try:
                outcomes, first_answer_s = _serve(launcher, args, model, level, started, console)
            except launch.LaunchError as exc:
                console.print(f"[red]kvpool demo: {exc}[/]")
                return 1
    _report(console, outcomes, first_answer_s, level, time.monotonic() - started)
    return 0


def _serve(
    launcher: launch.Launcher,
    args: argparse.Namespace,
    model: Path,
    level: str,
    started: float,
    console: Console,
) -> tuple[list[Outcome], float]:
    profile = launch.codec_profile(args.profile, console) if level not in ("raw", "lossless") else None
    p_side = launcher.start_sidecar("prefill-sidecar", level=level, profile=profile)
    d_side = launcher.start_sidecar("decode-sidecar", level=level, profile=profile)
    prefill = launcher.start_engine(
        "prefill-vllm", model,
        kv_transfer_config=vllm_args.kv_transfer_config(p_side.addresses["local"]),
    )  # fmt: skip
    decode = launcher.start_engine(
        "decode-vllm", model,
        kv_transfer_config=vllm_args.kv_transfer_config(d_side.addresses["local"]),
    )  # fmt: skip
    launcher.wait_ready(p_side, d_side, timeout_s=args.start_timeout)
    router = launcher.start_router(
        "router", [prefill.url], [decode.url],
        extra_args=["--decode-sidecar", d_side.addresses["peer"]],
    )  # fmt: skip
    launcher.wait_ready(prefill, decode, router, timeout_s=args.start_timeout)

    outcomes: list[Outcome] = []
    first_answer_s = 0.0
    for prompt in _prompts(args.long_prompt_tokens):
        body = {"model": models.DEFAULT_MODEL, "prompt": prompt,
                "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
        p_before = completions.scrape(p_side.addresses["metrics"])
        d_before = completions.scrape(d_side.addresses["metrics"])
        answer = completions.stream_completion(router.url, body)
        if not outcomes:
            first_answer_s = time.monotonic() - started
            console.print(f"[bold green]first answer[/] {first_answer_s:.1f} s after start")
        p_after = completions.scrape(p_side.addresses["metrics"])
        # the decode sidecar counts a transfer (loaded or failed) before decode learns of it
        d_after = completions.scrape(d_side.addresses["metrics"])
        # one engine alone: the prefill engine answers the same prompt by itself
        reference = completions.complete(prefill.url, body)
        outcomes.append(Outcome(
            prompt=prompt,
            prompt_tokens=int(reference["usage"]["prompt_tokens"]),
            ttft_s=answer.ttft_s,
            prefill_ms=float(answer.headers.get("x-kvpool-prefill-ms", "nan")),
            raw_bytes=completions.delta(p_before, p_after, "kvpool_sidecar_raw_bytes_total",
                                        direction="encoded"),
            wire_bytes=completions.delta(p_before, p_after, "kvpool_sidecar_wire_bytes_total",
                                         direction="encoded"),
            loaded=completions.delta(d_before, d_after, "kvpool_sidecar_transfers_total",
                                     side="decode", outcome="loaded") > 0,
            text=answer.text,
            reference=reference["choices"][0]["text"],
        ))  # fmt: skip
    return outcomes, first_answer_s


def _report(console: Console, outcomes: list[Outcome], first_answer_s: float, level: str,
            total_s: float) -> None:  # fmt: skip
    table = Table(title=f"P/D through the router (KV level: {level})")
    for column in ("#", "prompt tokens", "TTFT ms", "prefill ms", "KV raw", "KV on wire", "ratio",
                   "KV loaded", "same as one engine"):  # fmt: skip
        table.add_column(column, justify="right")
    for i, o in enumerate(outcomes, 1):
        ratio = f"{o.raw_bytes / o.wire_bytes:.2f}x" if o.wire_bytes else "-"
        table.add_row(
            str(i), str(o.prompt_tokens), f"{o.ttft_s * 1000:.0f}", f"{o.prefill_ms:.0f}",
            _size(o.raw_bytes), _size(o.wire_bytes), ratio,
            "[green]yes[/]" if o.loaded else "[yellow]no: recomputed[/]",
            "[green]yes[/]" if o.matches else f"[yellow]no: {o.same_words()}[/]",
        )  # fmt: skip
    console.print(table)
    for i, o in enumerate(outcomes, 1):
        prompt = o.prompt if len(o.prompt) < 60 else o.prompt[:57] + "..."
        answer = " ".join(o.text.split())
        console.print(f"[bold]{i}[/] {prompt!r}\n  -> {answer!r}", soft_wrap=True)
    if level not in ("raw", "lossless") and not all(o.matches for o in outcomes):
        console.print(f"[dim]level {level!r} is lossy: greedy decoding may take another path "
                      "after a few tokens (--level lossless transfers the KV bit-exact)[/]")  # fmt: skip
    console.print(f"first answer {first_answer_s:.1f} s after start; demo took {total_s:.1f} s "
                  "(CPU engines on a shared machine)")  # fmt: skip


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
