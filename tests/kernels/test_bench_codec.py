"""``kvpool bench codec --json``: the documented JSON shape, on a small real KV cache."""

from __future__ import annotations

import json

import pytest

from kvpool.cli import main
from kvpool.kernels import LEVELS
from tests.kernels.realmodel import needs_model

pytestmark = [pytest.mark.slow, needs_model]

ROW_KEYS = {
    "chunk_tokens",
    "level",
    "profile",
    "ratio_vs_fp16",
    "greedy_match",
    "greedy_prefix",
    "ppl_delta_pct",
    "kl",
    "bit_exact",
    "encoded_bytes",
    "encode_mb_s",
    "decode_mb_s",
}


def test_bench_codec_json_and_plot(tmp_path, capsys) -> None:
    png = tmp_path / "codec.png"
    argv = ["bench", "codec", "--json", "--tokens", "128", "--chunks", "64,128"]
    assert main([*argv, "--levels", "lossless,default", "--repeat", "1", "--plot", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)

    assert result["model"] == "smollm2-135m" and result["tokens"] == 128
    assert result["fp16_bytes"] == 2 * 30 * 2 * 128 * 192
    assert len(result["profile"]["hash"]) == 32
    rows, baselines = result["rows"], result["baselines"]
    assert {(r["chunk_tokens"], r["level"], r["profile"]) for r in rows} == {
        (c, lv, p) for c in (64, 128) for lv in ("lossless", "default") for p in (True, False)
    }
    assert {(r["chunk_tokens"], r["level"]) for r in baselines} == {
        (c, b) for c in (64, 128) for b in ("int8", "int4", "zstd3")
    }
    for row in rows + baselines:
        assert ROW_KEYS <= row.keys()
        assert row["ratio_vs_fp16"] > 1.0 and row["encode_mb_s"] > 0 and row["decode_mb_s"] > 0
        assert 0.0 <= row["greedy_match"] <= 1.0
        if row["level"] in ("lossless", "zstd3"):
            assert row["bit_exact"] and row["ppl_delta_pct"] == 0.0 and row["greedy_match"] == 1.0
    default = [r for r in rows if r["level"] == "default"]
    assert all(not r["bit_exact"] and r["ratio_vs_fp16"] > 3 for r in default)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_clear_errors(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "codec", "--levels", "best"])
    assert "unknown level" in capsys.readouterr().err
    assert LEVELS[0] == "lossless"
    with pytest.raises(SystemExit, match="exceeds --tokens"):
        main(["bench", "codec", "--tokens", "100", "--chunks", "256"])
