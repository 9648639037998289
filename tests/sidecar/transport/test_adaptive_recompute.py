"""When the adaptive policy gives a transfer up to a recompute, on synthetic figures (no codec,
no link, no clock): a codec of fixed speed and ratios, a link of fixed rate."""

from __future__ import annotations

import queue

import grpc
import pytest

from kvpool.sidecar import linkstream
from kvpool.sidecar.adaptive import (
    CODEC_LEVELS,
    RECOMPUTE,
    CodecModel,
    LevelCost,
    LevelPolicy,
    ThroughputEstimator,
    TransferDeadline,
)

CHUNK = 1_000_000
LINK = 12.5e6
"""100 Mbit/s in bytes per second."""
RATIOS = {"lossless": 0.85, "high": 0.33, "default": 0.23, "low": 0.21, "lowest": 0.165}
CODEC_S = 5e-9
"""Encode and decode seconds per raw byte (200 MB/s), wall and CPU alike."""
REST = 20 * CHUNK
STEADY = REST * RATIOS["lowest"] / LINK
"""The rest at the lowest level on the link, pipelined: the wire is the slowest stage
(264 ms against 100 ms of encoding)."""


def _policy() -> LevelPolicy:
    """A policy that has measured three chunks on the link, and nothing else yet."""
    costs = {lv: LevelCost(r, CODEC_S, CODEC_S, encode_cpu_s_per_byte=CODEC_S)
             for lv, r in RATIOS.items()}
    policy = LevelPolicy(CodecModel(costs), ThroughputEstimator(), overlap=True, margin=0.2)
    for _ in range(3):
        policy.estimator.observe(CHUNK, CHUNK / LINK)
    return policy


def _late(policy: LevelPolicy, seconds_left: float, progress: float | None = None) -> str:
    """The level of a chunk that fits no budget, with ``seconds_left`` for the rest."""
    return policy.choose(CHUNK, budget_s=-0.01, rest=(seconds_left, REST),
                         progress=progress).level


def test_synthetic_figures_are_what_the_tests_assume():
    policy = _policy()
    assert list(RATIOS) == list(CODEC_LEVELS)
    assert policy.model.predict("lowest", REST, LINK, {}, overlap=True,
                                own_speed=True) == pytest.approx(STEADY)
    assert policy.model.cpu_share is None, "no encoding timed yet"


def test_a_hopeless_rest_is_recomputed():
    assert _late(_policy(), STEADY / 3) == RECOMPUTE


def test_a_near_miss_is_sent_rather_than_recomputed():
    # the rest projected at 1.3x the time left: within the factor (1.5), it goes
    policy = _policy()
    decision = policy.choose(CHUNK, budget_s=-0.01, rest=(STEADY / 1.3, REST))
    assert decision.level in CODEC_LEVELS and "catches up" in decision.reason
    assert _late(policy, STEADY / 1.6) == RECOMPUTE
    assert _late(policy, -0.01) == RECOMPUTE, "past the deadline and its grace"


def test_no_recompute_once_most_of_the_kv_is_sent():
    policy = _policy()
    assert _late(policy, STEADY / 3, progress=0.4) == RECOMPUTE
    decision = policy.choose(CHUNK, budget_s=-0.01, rest=(STEADY / 3, REST), progress=0.5)
    assert decision.level != RECOMPUTE and "50% of the KV sent" in decision.reason


def test_no_recompute_while_the_sender_is_starved_of_cpu():
    policy = _policy()
    # one encoding that took 4x its CPU time in wall time: a quarter of a core
    policy.model.observe("lowest", CHUNK, int(CHUNK * RATIOS["lowest"]), 4 * CHUNK * CODEC_S,
                         encode_cpu_s=CHUNK * CODEC_S)
    assert policy.model.cpu_share == pytest.approx(0.25)
    decision = policy.choose(CHUNK, budget_s=-0.01, rest=(STEADY / 3, REST))
    assert decision.level != RECOMPUTE and "starved" in decision.reason
    # the figures of the codec's own speed are not those of the starved wall time
    assert policy.model.costs["lowest"].encode_cpu == pytest.approx(CODEC_S)
    for _ in range(3):  # three encodings on a whole core: clean figures, judged again
        policy.model.observe("lowest", CHUNK, int(CHUNK * RATIOS["lowest"]), CHUNK * CODEC_S,
                             encode_cpu_s=CHUNK * CODEC_S)
    assert policy.model.cpu_share == pytest.approx(1.0)
    assert _late(policy, STEADY / 3) == RECOMPUTE


def test_cpu_share_counts_only_encodings_timed_both_ways():
    model = CodecModel({"low": LevelCost(0.2, CODEC_S, CODEC_S)})
    model.observe("low", CHUNK, CHUNK // 5, 0.01)
    assert model.cpu_share is None
    model.observe("low", CHUNK, CHUNK // 5, 0.01, encode_cpu_s=0.005)
    model.observe("low", CHUNK, CHUNK // 5, 0.03, encode_cpu_s=0.005)
    assert model.cpu_share == pytest.approx(0.01 / 0.04)


def test_a_revision_neither_recomputes_nor_is_held_back_by_the_recompute_rule():
    # the rule only says recompute or not; a revision never recomputes either way
    policy = _policy()
    first = policy.choose(CHUNK, budget_s=1.0)
    for _ in range(3):
        policy.estimator.observe(CHUNK, 100 * CHUNK / LINK)
    revised = policy.revise(first, CHUNK, budget_s=-0.01, rest=(STEADY / 3, REST), progress=0.1)
    assert revised is not None and revised.level != RECOMPUTE


def test_deadline_progress_is_the_fraction_of_raw_bytes_sent():
    d = TransferDeadline(deadline=10.0, total_raw_bytes=4 * CHUNK)
    assert d.progress() == 0.0
    d.sent(CHUNK)
    assert d.progress() == pytest.approx(0.25)
    d.sent(4 * CHUNK)
    assert d.progress() == 1.0
    assert TransferDeadline(deadline=10.0, total_raw_bytes=0).progress() == 1.0


class _Failed(grpc.RpcError):
    pass


def test_acknowledgements_are_stamped_as_they_come():
    arrivals: queue.Queue = queue.Queue()
    linkstream._read_acks(iter(["a", "b"]), arrivals)
    first, second, end = arrivals.get(), arrivals.get(), arrivals.get()
    assert (first[0], second[0], end) == ("a", "b", None)
    assert first[1] <= second[1] and first[2] <= second[2], "perf_counter, monotonic"

    def failing():
        yield "a"
        raise _Failed()

    linkstream._read_acks(failing(), arrivals)
    assert arrivals.get()[0] == "a" and isinstance(arrivals.get(), _Failed)
    assert arrivals.empty()


def _behind(encode_s_per_byte: float) -> str:
    """The level of a chunk that fits no budget, on a codec encoding at that speed."""
    costs = {lv: LevelCost(r, encode_s_per_byte, CODEC_S, encode_cpu_s_per_byte=CODEC_S)
             for lv, r in RATIOS.items()}
    policy = LevelPolicy(CodecModel(costs), ThroughputEstimator(initial_bps=LINK), overlap=True,
                         margin=0.2, allow_recompute=False)
    return policy.choose(CHUNK, budget_s=-0.01).level


def test_catching_up_takes_the_best_level_that_arrives_as_soon():
    # a starved codec (30 ms a chunk, every level alike): each lossy level waits for its
    # encoding longer than for the wire, so the best of them arrives as soon as the lowest
    assert _behind(30e-9) == "high"
    # a codec faster than the link: fewer bytes arrive sooner, the lowest catches up
    assert _behind(CODEC_S) == "lowest"
