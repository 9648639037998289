"""The ``kvpool`` command: one entry point, one subcommand per job.

Each subcommand lives in the module that owns it; this file only maps names to modules,
and imports a module when its command runs (``kvpool operator`` never imports torch).
A command module exposes two functions::

    def configure(parser: argparse.ArgumentParser) -> None   # add its arguments
    def run(args: argparse.Namespace) -> int                 # do the work, return exit code
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    name: str
    module: str
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("demo", "kvpool.demo", "run prefill + decode + sidecars + router locally on the CPU"),
    Command("profile", "kvpool.kernels.profile_cli", "build a codec model profile from real KV"),
    Command("sidecar", "kvpool.sidecar.server", "run the KV transfer sidecar beside a vLLM worker"),
    Command("router", "kvpool.sidecar.router", "run the OpenAI-compatible prefill/decode router"),
    Command("operator", "kvpool.operator.main", "run the KVCachePool operator (kopf)"),
    Command("crd", "kvpool.operator.crd", "print the KVCachePool CustomResourceDefinition"),
    Command("fuzz", "kvpool.kernels.fuzz", "fuzz the codec's decoder (kvpool fuzz codec)"),
)

BENCHMARKS: tuple[Command, ...] = (
    Command("codec", "kvpool.kernels.bench", "codec ratio, quality and speed on real KV"),
    Command("transfer", "kvpool.sidecar.bench_transfer", "KV transport throughput and adaptivity"),
    Command("e2e", "kvpool.sidecar.bench_e2e", "TTFT and exposed KV time, single engine vs P/D"),
    Command("stream", "kvpool.sidecar.bench_stream", "the sidecars' gRPC KV stream vs plain TCP"),
    Command("local", "kvpool.sidecar.bench_local",
            "the connector's Put and load with its sidecar: bytes vs shared memory"),
    Command("operator", "kvpool.operator.bench", "operator reconcile latency and memory"),
)


def _add(subparsers: argparse._SubParsersAction, command: Command) -> None:
    parser = subparsers.add_parser(command.name, help=command.help, description=command.help)
    parser.set_defaults(_module=command.module)
    try:
        module = importlib.import_module(command.module)
    except ImportError as exc:
        raise SystemExit(f"kvpool: cannot load {command.module!r} for this command: {exc}") from exc
    module.configure(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Build the parser; only the module of the command named in ``argv`` is imported."""
    parser = argparse.ArgumentParser(prog="kvpool", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv else None
    for command in COMMANDS:
        if command.name == wanted:
            _add(sub, command)
        else:
            sub.add_parser(command.name, help=command.help)
    bench = sub.add_parser("bench", help="benchmarks (one JSON object on stdout)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    wanted_bench = argv[1] if wanted == "bench" and len(argv) > 1 else None
    for command in BENCHMARKS:
        if command.name == wanted_bench:
            _add(bench_sub, command)
        else:
            bench_sub.add_parser(command.name, help=command.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
