"""Adaptive level choice with figures measured here: the real codec on real KV, a real socket."""

from __future__ import annotations

import copy
import socket
import threading
import time

import pytest

from kvpool.kernels import LEVELS
from kvpool.sidecar.adaptive import (
    CODEC_LEVELS,
    RAW,
    RECOMPUTE,
    CodecModel,
    LevelPolicy,
    ThroughputEstimator,
    TransferDeadline,
)
from kvpool.sidecar.health import TransferHealth

MB = 1_000_000
CHUNK = 4 * MB
MBIT = 1e6 / 8


def _loopback_rate(nbytes: int = 32 * MB, chunk: int = 1 << 20) -> list[tuple[int, float]]:
    """Send ``nbytes`` over a real TCP loopback connection; (bytes, seconds) per MiB acked."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            got = 0
            while got < nbytes:
                data = conn.recv(1 << 20)
                got += len(data)
                if got // chunk != (got - len(data)) // chunk:
                    conn.sendall(b"k")

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    samples = []
    payload = bytes(chunk)
    with socket.create_connection(("127.0.0.1", port)) as client:
        for _ in range(nbytes // chunk):
            t0 = time.perf_counter()
            client.sendall(payload)
            client.recv(1)
            samples.append((chunk, time.perf_counter() - t0))
    thread.join(10)
    server.close()
    return samples


def test_levels_match_the_codec():
    assert CODEC_LEVELS == LEVELS


def test_estimator_follows_a_real_link_and_drops_at_once():
    est = ThroughputEstimator()
    assert est.bps is None
    for nbytes, seconds in _loopback_rate():
        est.observe(nbytes, seconds)
    fast = est.bps
    assert fast > 100 * MBIT, f"loopback measured at only {fast * 8 / 1e6:.0f} Mbit/s"
    est.observe(CHUNK, CHUNK / (100 * MBIT))
    assert est.bps < 300 * MBIT, "a chunk 10x slower lowers the estimate at once"
    est.observe(CHUNK, CHUNK / (100 * MBIT))
    est.observe(CHUNK, CHUNK / (100 * MBIT))
    assert est.bps == pytest.approx(100 * MBIT), "a lasting change takes over in 3 chunks"
    est.observe(CHUNK, CHUNK / fast)
    assert 100 * MBIT < est.bps < 160 * MBIT, "one fast outlier barely lifts it"


def test_codec_figures_are_sane(codec_model):
    ratios = [codec_model.costs[lv].ratio for lv in LEVELS]
    print({lv: round(r, 3) for lv, r in zip(LEVELS, ratios)})
    assert ratios == sorted(ratios, reverse=True), "lower levels compress more"
    assert ratios[-1] < 0.25 < ratios[0] < 1.0


def test_fast_link_sends_raw(codec_model):
    est = ThroughputEstimator()
    for nbytes, seconds in _loopback_rate():
        est.observe(nbytes, seconds)
    policy = LevelPolicy(copy.deepcopy(codec_model), est)
    decision = policy.choose(CHUNK, budget_s=1.0)
    assert decision.level == RAW
    assert decision.reason == "encoding costs more than it saves"
    assert decision.predicted_s < codec_model.predict("lossless", CHUNK, est.bps, {})


def _slow_link(model: CodecModel) -> float:
    """100 Mbit/s, or slower where this machine's codec is too slow (busy CPU) for the
    lowest level to beat raw by 3x there."""
    lowest = model.costs["lowest"]
    pays = (1 - 3 * lowest.ratio) / (3 * (lowest.encode_s_per_byte + lowest.decode_s_per_byte))
    return min(100 * MBIT, pays)


def test_slow_link_lowers_the_level_as_the_budget_shrinks(codec_model):
    slow = _slow_link(codec_model)
    policy = LevelPolicy(copy.deepcopy(codec_model), ThroughputEstimator(initial_bps=slow))
    raw_s = CHUNK / slow
    lowest_s = codec_model.predict("lowest", CHUNK, slow, {})
    assert lowest_s < raw_s / 2, "on a slow link the codec pays for itself"
    budgets = [raw_s * 1.01] + [lowest_s + (raw_s - lowest_s) * f for f in (0.8, 0.5, 0.3, 0.1)]
    chosen = [policy.choose(CHUNK, b).level for b in budgets]
    order = [RAW, *LEVELS]
    ranks = [order.index(lv) for lv in chosen]
    # raw just fits the first budget; lossless (as exact) wins where this codec is faster
    exact = min((RAW, "lossless"), key=lambda lv: codec_model.predict(lv, CHUNK, slow, {}))
    assert chosen[0] == exact and ranks == sorted(ranks) and chosen[-1] != RAW, chosen
    assert policy.choose(CHUNK, lowest_s * 0.5).level == RECOMPUTE
    strict = LevelPolicy(copy.deepcopy(codec_model), ThroughputEstimator(initial_bps=slow),
                         allow_recompute=False)
    fastest = min(LEVELS, key=lambda lv: codec_model.predict(lv, CHUNK, slow, {}))
    assert strict.choose(CHUNK, lowest_s * 0.5).level == fastest


def test_first_chunk_without_a_measurement_uses_the_start_level(codec_model):
    policy = LevelPolicy(copy.deepcopy(codec_model), start_level="low")
    decision = policy.choose(CHUNK, 1.0)
    assert decision.level == "low" and decision.bps is None


def test_decisions_are_counted_and_reported(codec_model):
    health = TransferHealth()
    policy = LevelPolicy(copy.deepcopy(codec_model), ThroughputEstimator(initial_bps=100 * MBIT),
                         on_decision=lambda d: health.chunk(d.level))
    # an ample budget gets an exact transfer: raw, or lossless where this machine's
    # measured codec beats the link; which one depends on the CPU, the counting does not
    exact = [policy.choose(CHUNK, budget).level for budget in (10.0, 10.0)]
    assert exact[0] in (RAW, "lossless") and exact[1] == exact[0]
    policy.choose(CHUNK, 0.0)
    assert policy.counts == {exact[0]: 2, RECOMPUTE: 1}
    assert health.summary()["level_mix"] == {exact[0]: 2 / 3, RECOMPUTE: 1 / 3}


def test_measured_chunks_correct_the_estimates(codec_model):
    model = copy.deepcopy(codec_model)
    priors = copy.deepcopy(codec_model.costs)
    before = model.predict("low", CHUNK, 100 * MBIT, priors)
    same_speed = CHUNK * priors["default"].encode_s_per_byte
    model.observe("default", CHUNK, int(CHUNK * priors["default"].ratio * 1.5), same_speed)
    assert model.costs["default"].ratio == pytest.approx(priors["default"].ratio * 1.5)
    assert model.predict("low", CHUNK, 100 * MBIT, priors) > before, \
        "an unmeasured level follows the drift of the measured ones"


def test_a_busy_machine_slows_every_level_s_encoding(codec_model):
    # the encoding measured at twice the calibrated time: a level not used yet is expected
    # at twice its calibrated time too, not at the speed of a quiet machine
    model = copy.deepcopy(codec_model)
    priors = copy.deepcopy(codec_model.costs)
    model.observe("default", CHUNK, int(CHUNK * priors["default"].ratio),
                  2 * CHUNK * priors["default"].encode_s_per_byte)
    encode, ratio, decode = model.stages("low", priors)
    assert encode == pytest.approx(2 * priors["low"].encode_s_per_byte)
    assert ratio == pytest.approx(priors["low"].ratio)
    assert decode == priors["low"].decode_s_per_byte, "decoding runs on the receiver"


def test_deadline_shares_time_by_raw_bytes():
    d = TransferDeadline.from_ttft(arrival=100.0, ttft_target_s=2.0, total_raw_bytes=4 * CHUNK,
                                   decode_reserve_s=0.4)
    assert d.deadline == pytest.approx(101.6)
    assert d.chunk_budget(CHUNK, now=100.0) == pytest.approx(0.4)
    d.sent(CHUNK)
    assert d.chunk_budget(CHUNK, now=101.0) == pytest.approx(0.2)
    assert d.chunk_budget(CHUNK, now=102.0) < 0


def test_bad_configuration_is_refused(codec_model):
    with pytest.raises(ValueError, match="window"):
        ThroughputEstimator(window=0)
    with pytest.raises(ValueError, match="start_level"):
        LevelPolicy(codec_model, start_level="fastest")
    with pytest.raises(ValueError, match="no cost figures"):
        LevelPolicy(CodecModel({}), levels=LEVELS)


def test_estimator_counts_the_gaps_a_shaped_link_refills_its_bucket_in():
    # 100 kB chunks that each leave in 1 ms (a token bucket's burst) but are acknowledged
    # 10 ms apart: the link sustains 10 MB/s, not 100.
    est = ThroughputEstimator()
    for i in range(1, 4):
        est.observe(100_000, 0.001, at=0.010 * i)
    assert est.bps == pytest.approx(300_000 / 0.021)
    est.observe(100_000, 0.001)  # an untimed sample ends the span
    assert est.bps == pytest.approx(100_000 / 0.001)


def test_deadline_schedule_dues_chunks_by_raw_bytes():
    d = TransferDeadline(deadline=10.0, total_raw_bytes=4 * CHUNK, start=6.0, grace_s=1.0)
    assert d.due(CHUNK) == pytest.approx(7.0)
    d.sent(CHUNK)
    assert d.due(CHUNK) == pytest.approx(8.0)
    assert d.rest(now=7.8) == (pytest.approx(3.2), 3 * CHUNK)
    d.shift(1.0)
    assert d.due(CHUNK) == pytest.approx(9.0) and d.deadline == pytest.approx(11.0)


def test_behind_schedule_sends_the_fastest_level_and_recomputes_only_when_the_rest_cannot(
        codec_model):
    slow = _slow_link(codec_model)
    policy = LevelPolicy(copy.deepcopy(codec_model), ThroughputEstimator(initial_bps=slow),
                         overlap=True, margin=0.2)
    steady = min(codec_model.predict(lv, CHUNK, slow, {}, overlap=True) for lv in LEVELS)
    late = policy.choose(CHUNK, budget_s=-0.01, rest=(10 * steady * 1.5, 10 * CHUNK))
    assert late.level in LEVELS[1:] and "catches up" in late.reason
    early = policy.choose(CHUNK, budget_s=-0.01, rest=(10 * steady * 0.5, 10 * CHUNK))
    assert early.level != RECOMPUTE, "not on fewer than 3 measured chunks"
    for _ in range(3):
        policy.estimator.observe(CHUNK, CHUNK / slow)
    hopeless = policy.choose(CHUNK, budget_s=-0.01, rest=(10 * steady * 0.5, 10 * CHUNK))
    assert hopeless.level == RECOMPUTE
    # bytes still on the wire ahead of the chunk count against its budget
    raw_s = CHUNK / slow
    assert policy.choose(CHUNK, budget_s=raw_s * 2).level in (RAW, "lossless")
    assert policy.choose(CHUNK, budget_s=raw_s * 2, due_s=raw_s * 2,
                         queued_bytes=2 * CHUNK).level not in (RAW, "lossless")


def test_a_chunk_chosen_for_a_fast_link_is_revised_when_the_link_slows_down(codec_model):
    slow = _slow_link(codec_model)
    policy = LevelPolicy(copy.deepcopy(codec_model), ThroughputEstimator(initial_bps=10 * slow),
                         overlap=True)
    raw_s = CHUNK / slow
    first = policy.choose(CHUNK, budget_s=raw_s * 0.5)
    assert first.level in (RAW, "lossless")
    assert policy.revise(first, CHUNK, budget_s=raw_s * 0.5) is None, "the link has not changed"
    policy.estimator.observe(CHUNK, raw_s)  # the chunk before it crossed a 10x slower link
    revised = policy.revise(first, CHUNK, budget_s=raw_s * 0.5)
    assert revised is not None and revised.level in LEVELS[1:] and revised.chunk == first.chunk
    assert policy.counts == {revised.level: 1}, "the revision replaces the first choice"


def test_one_stalled_chunk_is_no_reason_to_recompute(codec_model):
    # three chunks at the link's rate, then one acknowledged 20x late (a starved process):
    # the next chunk catches up at the fastest form; two late of the last three are a link
    slow = _slow_link(codec_model)
    policy = LevelPolicy(copy.deepcopy(codec_model), ThroughputEstimator(), overlap=True,
                         margin=0.2)
    for _ in range(3):
        policy.estimator.observe(CHUNK, CHUNK / slow)
    policy.estimator.observe(CHUNK, 20 * CHUNK / slow)
    assert policy.estimator.median_bps == pytest.approx(slow)
    steady = min(codec_model.predict(lv, CHUNK, slow, {}, overlap=True) for lv in LEVELS)
    rest = (10 * steady * 1.5, 10 * CHUNK)
    assert policy.choose(CHUNK, budget_s=-0.01, rest=rest).level != RECOMPUTE
    policy.estimator.observe(CHUNK, 20 * CHUNK / slow)
    assert policy.choose(CHUNK, budget_s=-0.01, rest=rest).level == RECOMPUTE


def test_a_revision_never_recomputes_a_chunk_already_chosen(codec_model):
    # chosen for a fast link, which then turned out hopeless: the chunk goes at the fastest
    # form (a recompute, if any, is the next choice's, on more than one slow sample)
    slow = _slow_link(codec_model)
    policy = LevelPolicy(copy.deepcopy(codec_model), ThroughputEstimator(initial_bps=100 * slow),
                         overlap=True)
    first = policy.choose(CHUNK, budget_s=CHUNK / slow)
    for _ in range(3):
        policy.estimator.observe(CHUNK, 100 * CHUNK / slow)
    revised = policy.revise(first, CHUNK, budget_s=0.001, rest=(0.001, 10 * CHUNK))
    assert revised is not None and revised.level not in (RECOMPUTE, first.level)
    assert policy.choose(CHUNK, budget_s=0.001, rest=(0.001, 9 * CHUNK)).level == RECOMPUTE
