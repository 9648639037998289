"""Adaptive levels over a real shaped link: two network namespaces joined by a veth pair,
the sender's side rate-limited by a tc tbf qdisc whose rate drops mid-stream from
1 Gbit/s to 100 Mbit/s, a gRPC stream of real KV chunks between them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvpool.sidecar import netns
from kvpool.sidecar.adaptive import RAW, RECOMPUTE

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


# A CPU stall on a busy 2-core machine reads, to the sender, like a link that slowed down:
# the policy then rightly leaves raw early. Such a run is repeated, not excused.
@pytest.mark.flaky(reruns=2)
def test_levels_follow_the_link_when_its_rate_drops(link, real_kv, codec_model):
    # The budget: raw at 1 Gbit/s fits easily, raw after the drop cannot, the codec can
    # (from this machine's measured codec speed, so a busy CPU moves the budget along).
    chunk = 2 * TOKENS * real_kv[0][0].shape[1] * 2
    layers = len(real_kv[0])
    slow = 100e6 / 8
    best = min(codec_model.predict(lv, chunk, slow, {}, overlap=True) for lv in codec_model.costs)
    if best * 1.6 > chunk / slow:
        pytest.skip(f"the codec runs at {chunk / best / 1e6:.0f} MB/s on this busy machine now: "
                    "too slow to beat raw at 100 Mbit/s")
    # before the drop: raw at 1 Gbit/s; the chunk on the wire when it drops: raw at
    # 100 Mbit/s; after: the best level (x1.6 margins: a busy machine jitters).
    deadline = (DROP_AFTER * chunk / (1e9 / 8) * 3 + 2 * chunk / slow
                + (layers - DROP_AFTER - 2) * best * 1.6)
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
    finally:
        for proc in (sender, receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    levels = done["levels"]
    print(f"deadline {deadline:.3f} s, finished {done['finished_s']:.3f} s, levels {levels}")
    # The estimator drops with the first slow acknowledgement; the chunk sent then was
    # chosen before the drop, and one more before that acknowledgement came (pipelined).
    # At 1 Gbit/s only exact forms pay: raw, or lossless where this machine's codec is fast
    # enough to beat the wire. Whether the request then meets its deadline is a speed
    # figure: `kvpool bench transfer` measures it (adaptive vs every fixed level, on_time).
    exact = (RAW, "lossless")
    before, after = levels[:DROP_AFTER], levels[DROP_AFTER + REACTION:]
    assert before and all(lv in exact for lv in before), "1 Gbit/s: lossy coding does not pay"
    # At 100 Mbit/s raw does not fit its share of the time; the lossy levels carry the
    # stream (the policy may spend slack left towards the end on a better level, an exact
    # one included, so only the first half after the reaction is held to it).
    lossy = [lv for lv in after if lv not in (*exact, RECOMPUTE)]
    assert after and RAW not in after[:len(after) // 2], "100 Mbit/s: raw is too slow"
    assert len(lossy) * 2 > len(after), "the codec's lossy levels take over"
