"""kvpool bench e2e: its statistics, its argument checks and the gRPC-vs-TCP measurement
(the engine runs themselves are what ``kvpool bench e2e`` does; see the report)."""

from __future__ import annotations

import argparse

import pytest

from kvpool.sidecar import bench_e2e, bench_stream


def test_percentiles() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert bench_e2e.percentiles(values) == {"p50": 10.5, "p95": 19.0}
    assert bench_e2e.percentiles([7.0]) == {"p50": 7.0, "p95": 7.0}
    assert bench_e2e.percentiles([]) == {}


def test_bad_choices_are_refused() -> None:
    parser = argparse.ArgumentParser()
    bench_e2e.configure(parser)
    args = parser.parse_args(["--prompts", "2k"])
    with pytest.raises(SystemExit, match="unknown prompt"):
        bench_e2e.run(args)
    args = parser.parse_args(["--scenarios", "loopback,wifi"])
    with pytest.raises(SystemExit, match="unknown scenario"):
        bench_e2e.run(args)


def test_prompts_are_distinct_and_sized(model_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = bench_e2e.make_prompts(tokenizer, 1000, 4, salt=1)
    assert len(set(prompts)) == 4
    assert len({p[:200] for p in prompts}) == 4  # no shared prefix: no prefix-cache hits
    for prompt in prompts:
        assert 950 <= len(tokenizer(prompt)["input_ids"]) <= 1050


def test_grpc_vs_tcp_measures_both() -> None:
    result = bench_stream.grpc_vs_tcp(8, repeats=2, chunk_mib=1)
    assert result["grpc_gbps"] > 0 and result["tcp_gbps"] > 0
    assert len(result["grpc_vs_tcp_runs"]) == 2
    assert min(result["grpc_vs_tcp_runs"]) <= result["grpc_vs_tcp"] <= max(result["grpc_vs_tcp_runs"])
    assert result["grpc_stream"]["mib"] == 8 and result["grpc_stream"]["chunk_bytes"] == 1 << 20


def test_stream_benchmark_refuses_bad_sizes() -> None:
    parser = argparse.ArgumentParser()
    bench_stream.configure(parser)
    with pytest.raises(SystemExit, match="must be positive"):
        bench_stream.run(parser.parse_args(["--mib", "0"]))
