"""Adaptive levels over a real shaped link: two network namespaces joined by a veth pair,
the sender's side rate-limited by a tc tbf qdisc whose rate drops mid-stream from
1 Gbit/s to 100 Mbit/s, a gRPC stream of real KV chunks between them."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from kvpool.sidecar import netns, realkv
from kvpool.sidecar.adaptive import CODEC_LEVELS, RAW, CodecModel

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TOKENS = 512
DROP_AFTER = 6  # chunks sent at 1 Gbit/s before the rate drops
REACTION = 4  # chunks the sender may take to notice


@pytest.fixture
def link():
    """Namespaces ``a`` (sender) and ``b`` (receiver) joined by a 1 Gbit/s veth pair."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with netns.Link("1gbit", latency_ms=20) as made:
        yield made


def _spawn(link: netns.Link, side: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*link.exec_in(side), sys.executable, "-m", "kvpool.sidecar.linkstream", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def _line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"linkstream exited early (rc={proc.wait(10)})")
    return json.loads(line)


def _codec_now(keys, values) -> CodecModel:
    """The codec's figures on one chunk of the prompt, measured now (the machine's load as
    the stream will see it, not as it was when the test session started)."""
    from kvpool import kernels

    sample = kernels.KVCache(keys=[keys[0]], values=[values[0]])
    return CodecModel.calibrate(lambda kv, lv: kernels.encode(kv, level=lv), kernels.decode,
                                sample, kernels.LEVELS, repeats=3, statistic=statistics.median)


def _rank(level: str) -> int:
    """0 for an exact form (raw, lossless), then one step per codec level down the ladder."""
    return 0 if level in (RAW, "lossless") else CODEC_LEVELS.index(level)


def _deadline(keys, values) -> float | str:
    """Raw at 1 Gbit/s fits easily, after the drop neither raw nor lossless can, the codec's
    lossy levels can (from this machine's codec speed measured now, so a busy CPU moves the
    budget along); or why there is no such deadline now (the codec too slow on this busy
    machine to beat lossless at 100 Mbit/s by a margin)."""
    chunk, layers = keys[0].nbytes + values[0].nbytes, len(keys)
    slow = 100e6 / 8
    model = _codec_now(keys, values)
    best = min(model.predict(lv, chunk, slow, {}, overlap=True) for lv in model.costs)
    exact = chunk * min(1.0, model.costs["lossless"].ratio) / slow
    if best * 1.6 > exact * 0.8:
        return (f"the codec runs at {chunk / best / 1e6:.0f} MB/s: too slow now to beat "
                "lossless at 100 Mbit/s")
    # before the drop: raw at 1 Gbit/s (x3); the chunks on the wire when it drops: raw at
    # 100 Mbit/s; after: the fastest level (x1.6 margins: a busy machine jitters).
    return (_before_drop_s(chunk) + 2 * chunk / slow + (layers - DROP_AFTER - 2) * best * 1.6)


def _before_drop_s(chunk: int) -> float:
    """The deadline's allowance for the chunks before the drop: raw at 1 Gbit/s, x3."""
    return DROP_AFTER * chunk / (1e9 / 8) * 3


def _stream(link: netns.Link, deadline: float, layers: int) -> dict:
    """One transfer at 1 Gbit/s dropping to 100 Mbit/s after DROP_AFTER chunks; the sender's
    ``done`` report."""
    link.set_rate("1gbit")
    receiver = _spawn(link, "b", "serve", "--host", link.address("b"))
    sender = None
    try:
        port = _line(receiver)["port"]
        sender = _spawn(link, "a", "send", "--target", f"{link.address('b')}:{port}", "--tokens",
                        str(TOKENS), "--policy", "adaptive", "--deadline", f"{deadline:.3f}",
                        "--initial-mbps", "1000", "--wait", "--hold-after", str(DROP_AFTER))
        assert _line(sender)["chunks"] == layers
        sender.stdin.write("go\n")
        sender.stdin.flush()
        chunks, done = [], None
        while done is None:
            msg = _line(sender)
            if msg["event"] == "chunk":
                chunks.append(msg)
                if len(chunks) == DROP_AFTER:  # the sender holds (its clock stopped) meanwhile
                    link.set_rate("100mbit")
                    sender.stdin.write("go\n")
                    sender.stdin.flush()
            else:
                done = msg
        assert sender.wait(30) == 0
        return done
    finally:
        for proc in (sender, receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _starved(done: dict, chunk: int) -> str | None:
    """Why the run says nothing of the policy, when its processes were starved of CPU (the
    2 cores shared with other work), or None. Either the chunks before the drop took more
    than the deadline allows them (pro rata when the stream ended before the drop; raw at
    1 Gbit/s crosses in a third of that), or the sender's encodings got less than two
    thirds of a core (wall over CPU time): the deadline, set from the codec's speed before
    the run, no longer held."""
    before = done["chunks"][:DROP_AFTER]
    took = before[-1]["arrived_s"] if before else 0.0
    if took > _before_drop_s(chunk) * len(before) / DROP_AFTER:
        return f"the chunks before the drop took {took * 1e3:.0f} ms"
    wall = sum(c["encode_s"] for c in done["chunks"])
    cpu = sum(c["encode_cpu_s"] for c in done["chunks"])
    if cpu > 0 and wall > 1.5 * cpu:
        return f"the encodings got {cpu / wall:.0%} of a core"
    return None


ATTEMPTS = 3


def test_levels_follow_the_link_when_its_rate_drops(link):
    keys, values = realkv.prompt_kv(TOKENS)
    chunk, layers = keys[0].nbytes + values[0].nbytes, len(keys)
    busy = []
    for _ in range(ATTEMPTS):  # a fresh deadline each time, from the codec's speed then
        deadline = _deadline(keys, values)
        if isinstance(deadline, str):
            busy.append(deadline)
            continue
        done = _stream(link, deadline, layers)
        print(f"deadline {deadline:.3f} s, finished {done['finished_s']:.3f} s, "
              f"levels {done['levels']}")
        try:
            _check(done, deadline, layers)
            return
        except AssertionError as exc:
            starved = _starved(done, chunk)
            if starved is None:
                raise
            busy.append(f"{exc} ({starved})")  # a run that failed for want of CPU: again
    pytest.skip(f"this machine was too busy in every attempt: {'; '.join(busy)}")


def _check(done: dict, deadline: float, layers: int) -> None:
    """The run against what the issue asks (AssertionError where it falls short)."""
    levels = done["levels"]
    # What the issue asks: the request meets its deadline (no recompute: the codec can make
    # it), and the chunks switch to lower levels once the link has dropped. The estimator
    # drops with the first slow acknowledgement; the chunk sent then was chosen before the
    # drop, and one more before that acknowledgement came (pipelined): REACTION chunks.
    assert not done["recompute"], "the codec makes the deadline: no recompute"
    assert done["met_deadline"], (f"finished {done['finished_s'] * 1e3:.0f} ms after a "
                                  f"{deadline * 1e3:.0f} ms deadline")
    before, after = levels[:DROP_AFTER], levels[DROP_AFTER + REACTION:]
    assert len(levels) == layers and before and after
    # Which levels go before the drop is the policy's call, not the link's: at 1 Gbit/s raw
    # or lossless as a rule, but a stall on this shared machine reads as a slower link and
    # may rightly send a lossy one (even more of them than after the drop, where the budget
    # may leave room for `high`). The switch: exact forms at 1 Gbit/s, lossy ones after.
    assert any(_rank(lv) == 0 for lv in before), "1 Gbit/s: an exact form fits at first"
    # At 100 Mbit/s raw does not fit its share of the time; the lossy levels carry the
    # stream (the policy may spend slack left towards the end on a better level, an exact
    # one included, so only the first half after the reaction is held to raw's absence).
    lossy = [lv for lv in after if _rank(lv) > 0]
    assert RAW not in after[:len(after) // 2], "100 Mbit/s: raw is too slow"
    assert len(lossy) * 2 > len(after), "the codec's lossy levels take over"
