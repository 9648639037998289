"""Bandwidth-adaptive choice of the codec level per chunk (CacheGen §5).

The sender streams a prompt's KV chunk by chunk. Before encoding a chunk it asks
:class:`LevelPolicy` which form to send it in, given

- the link throughput the sender has measured so far (:class:`ThroughputEstimator`, fed
  with each chunk's bytes and the time the receiver took to acknowledge them),
- what each level costs and yields, learnt from the chunks already encoded
  (:class:`CodecModel`: compressed/raw ratio, encode and decode seconds per raw byte),
- the time left before the KV must be in decode (:class:`TransferDeadline`, derived from
  the request's TTFT target), shared among the chunks still to send in proportion to
  their raw size, and, where the transfer has a schedule, the instant the chunk is due,
- the chunk still on the wire ahead of it (a pipelined stream encodes the next chunk
  meanwhile), whose bytes and decoding it waits for.

The answer is the best-quality option predicted to arrive in time on a link, and a codec,
a margin slower than measured, where ``raw`` (the uncompressed bytes) ranks with
``lossless`` (both are exact) and wins over it when the link is fast enough that encoding
would cost more time than it saves. When nothing fits, the fastest level catches up; the
answer is ``recompute`` (decode runs the prefill itself) only when it is clearly the better
way: with most of the KV still to send, on figures of a sender not starved of CPU, and the
fastest level, kept up for the rest at the link's median rate and the codec's own speed
(its CPU time), projected to miss the deadline (plus a grace) by a clear factor.
Every decision is counted (``LevelPolicy.counts``, and through ``on_decision`` in the
sidecar's Prometheus metrics) and logged (INFO when the choice changes, else DEBUG).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RAW = "raw"
RECOMPUTE = "recompute"

#: The codec's levels, best quality first (``kvpool.kernels.LEVELS``; repeated here so
#: that the policy loads without the compiled codec).
CODEC_LEVELS: tuple[str, ...] = ("lossless", "high", "default", "low", "lowest")
EXACT_LEVELS = frozenset({RAW, "lossless"})


class ThroughputEstimator:
    """Link throughput seen by the sender, in bytes per second.

    Each sample is the bytes of one chunk and the seconds it spent on the wire (from
    handing it to the stream, or the previous acknowledgement, to its own). The estimate
    is the lowest of

    - the harmonic mean of the last ``window`` samples' rates (as robustMPC does),
    - the last sample's rate: a drop is taken at once (in the harmonic mean one 10x slower
      chunk among three only brings the estimate down 4x, and the chunk sent on that
      estimate arrives late),
    - the bytes acknowledged over the wall time the last ``window`` samples span, gaps
      between chunks included (when samples say ``at`` what instant they were acknowledged):
      a shaped link (token bucket) refills its bucket while the sender encodes the next
      chunk, and that chunk's first bytes then leave at once, so that one chunk's own rate
      overstates what the link sustains; over the span the refill is counted at its rate.

    A rise takes over within ``window`` chunks, and one fast outlier barely lifts it (nor
    does one stalled chunk weigh on more than the next choice and its share of the mean).
    """

    def __init__(self, *, window: int = 3, initial_bps: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if initial_bps is not None and initial_bps <= 0:
            raise ValueError(f"initial_bps must be positive, got {initial_bps}")
        self._rates: collections.deque[float] = collections.deque(maxlen=window)
        self._spans: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=window)
        if initial_bps is not None:
            self._rates.append(initial_bps)
        self.samples = 0

    def observe(self, nbytes: int, seconds: float, *, at: float | None = None) -> None:
        """Record that ``nbytes`` took ``seconds`` on the wire, acknowledged at instant ``at``
        (any monotonic clock, the same for every sample; None: unknown)."""
        if nbytes <= 0 or seconds <= 0:
            return
        self._rates.append(nbytes / seconds)
        if at is None:
            self._spans.clear()
        else:
            self._spans.append((nbytes, at - seconds, at))
        self.samples += 1

    def delivered_bps(self) -> float | None:
        """Bytes acknowledged over the wall time the recent samples span (None with fewer
        than two timed samples in a row)."""
        if len(self._spans) < 2:
            return None
        span = self._spans[-1][2] - self._spans[0][1]
        return sum(n for n, _, _ in self._spans) / span if span > 0 else None

    @property
    def mean_bps(self) -> float | None:
        """The harmonic mean alone: steadier than :attr:`bps` (one stalled chunk does not set
        it), for decisions that cannot be taken back."""
        if not self._rates:
            return None
        return len(self._rates) / sum(1 / r for r in self._rates)

    @property
    def median_bps(self) -> float | None:
        """The median of the last ``window`` samples' rates: one stalled chunk (a process
        starved of CPU for a while) does not move it at all, a lasting drop does within
        half the window; for decisions that cannot be taken back."""
        if not self._rates:
            return None
        return statistics.median(self._rates)

    @property
    def bps(self) -> float | None:
        """The estimate, or None before the first sample when no initial guess was given."""
        if not self._rates:
            return None
        delivered = self.delivered_bps()
        return min(self.mean_bps, self._rates[-1], delivered if delivered else math.inf)


@dataclass
class LevelCost:
    """What one level yields and costs per raw byte, as measured (running means)."""

    ratio: float
    """Encoded bytes per raw byte."""
    encode_s_per_byte: float
    """Wall time: what a chunk's encoding takes on this machine as busy as it is."""
    decode_s_per_byte: float
    measured: int = 0
    """How many chunks the figures come from (0: a prior)."""
    encode_cpu_s_per_byte: float | None = None
    """CPU time of the encoding: the codec's own speed, whatever else the machine runs
    (None: not measured apart, taken as the wall time)."""

    @property
    def encode_cpu(self) -> float:
        return self.encode_s_per_byte if self.encode_cpu_s_per_byte is None \
            else self.encode_cpu_s_per_byte


@dataclass
class CodecModel:
    """Per-level ratio and speed, learnt from the chunks encoded so far.

    Starts from priors (``calibrate`` measures them on a real sample; otherwise given by
    the caller). A level never used keeps its prior scaled by how far the measured levels
    strayed from theirs, in ratio and in encoding speed: when real KV compresses 20% worse
    than the sample did, or a busy machine encodes at half the speed it calibrated at,
    every level's estimate follows (the speed of the machine now is measured, not assumed).
    """

    costs: dict[str, LevelCost]
    alpha: float = 0.3
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=3),
                                      repr=False)
    """CPU and wall seconds of the last few encodings timed both ways (:attr:`cpu_share`)."""

    @property
    def cpu_share(self) -> float | None:
        """The share of a core the last few encodings got: their CPU time over their wall
        time (1 on an idle core, 0.25 where four processes share it; None before any)."""
        wall = sum(w for _, w in self.recent)
        return min(1.0, sum(c for c, _ in self.recent) / wall) if wall > 0 else None

    @classmethod
    def calibrate(cls, encode, decode, sample, levels: Sequence[str] = CODEC_LEVELS,
                  *, repeats: int = 2, statistic: Callable[[list[float]], float] = min,
                  ) -> CodecModel:
        """Measure every level on ``sample`` with the real codec: the best of ``repeats``
        (what the codec can do), or another ``statistic`` of them (``statistics.median``:
        what a busy machine lets it do now).

        ``encode(sample, level) -> bytes``; ``decode(bytes)``; ``sample`` is a ``KVCache``.
        """
        raw = raw_size(sample)
        costs = {}
        for level in levels:
            enc, cpu, dec = [], [], []
            for _ in range(max(1, repeats)):
                c0, t0 = time.thread_time(), time.perf_counter()
                data = encode(sample, level)
                t1, c1 = time.perf_counter(), time.thread_time()
                decode(data)
                t2 = time.perf_counter()
                enc.append(t1 - t0)
                cpu.append(c1 - c0)
                dec.append(t2 - t1)
            costs[level] = LevelCost(len(data) / raw, statistic(enc) / raw, statistic(dec) / raw,
                                     encode_cpu_s_per_byte=statistic(cpu) / raw)
        return cls(costs)

    def observe(self, level: str, raw_bytes: int, encoded_bytes: int,
                encode_s: float, decode_s: float | None = None, *,
                encode_cpu_s: float | None = None) -> None:
        """Fold one encoded chunk's figures into the level's running means (``encode_s``
        wall time, ``encode_cpu_s`` the encoding thread's CPU time)."""
        if raw_bytes <= 0 or level not in self.costs:
            return
        cost = self.costs[level]
        a = self.alpha if cost.measured else 1.0
        cost.ratio += a * (encoded_bytes / raw_bytes - cost.ratio)
        if encode_cpu_s is not None:
            if encode_s > 0:
                self.recent.append((encode_cpu_s, encode_s))
            cost.encode_cpu_s_per_byte = cost.encode_cpu + a * (encode_cpu_s / raw_bytes
                                                                - cost.encode_cpu)
        cost.encode_s_per_byte += a * (encode_s / raw_bytes - cost.encode_s_per_byte)
        if decode_s is not None:
            cost.decode_s_per_byte += a * (decode_s / raw_bytes - cost.decode_s_per_byte)
        cost.measured += 1

    def _drift(self, priors: dict[str, LevelCost], figure: Callable[[LevelCost], float]) -> float:
        """Geometric mean, over the levels measured, of their ``figure`` against its prior
        (1.0 when none is measured)."""
        factors = [figure(c) / figure(priors[lv]) for lv, c in self.costs.items()
                   if c.measured and lv in priors and figure(priors[lv]) > 0 and figure(c) > 0]
        return math.exp(sum(map(math.log, factors)) / len(factors)) if factors else 1.0

    def stages(self, level: str, priors: dict[str, LevelCost], *,
               own_speed: bool = False) -> tuple[float, float, float]:
        """Encode seconds, encoded bytes and decode seconds per raw byte of ``level``: as
        measured when it was used, else its prior scaled by the drift of the measured ones
        (decode, measured on the receiver, keeps its prior). Encoding in wall time (this
        machine as busy as it is), or with ``own_speed`` in CPU time (the codec's own)."""
        if level == RAW:
            return 0.0, 1.0, 0.0
        cost = self.costs[level]
        encode = (lambda c: c.encode_cpu) if own_speed else (lambda c: c.encode_s_per_byte)
        if cost.measured:
            return encode(cost), cost.ratio, cost.decode_s_per_byte
        return (encode(cost) * self._drift(priors, encode),
                cost.ratio * self._drift(priors, lambda c: c.ratio), cost.decode_s_per_byte)

    def predict(self, level: str, raw_bytes: int, bps: float, priors: dict[str, LevelCost],
                *, overlap: bool = False, cpu: float = 1.0, own_speed: bool = False) -> float:
        """Seconds a chunk costs: encode, wire and decode one after the other, or with
        ``overlap`` (a pipelined stream: chunk i+1 encodes while chunk i is on the wire and
        chunk i-1 decodes) the slowest of the three; ``cpu`` scales encode and decode;
        ``own_speed``: see :meth:`stages`."""
        encode, ratio, decode = self.stages(level, priors, own_speed=own_speed)
        stages = (encode * cpu, ratio / bps, decode * cpu)
        return raw_bytes * (max(stages) if overlap else sum(stages))


def raw_size(kv) -> int:
    """Bytes of a KVCache's tensors as they sit in memory (fp16: 2 bytes a value)."""
    total = 0
    for t in list(kv.keys) + list(kv.values):
        total += int(t.nbytes) if hasattr(t, "nbytes") else t.numel() * t.element_size()
    return total


@dataclass
class TransferDeadline:
    """The time by which a request's KV must be in decode, shared among its chunks.

    ``deadline`` is a ``time.monotonic()`` instant: the request's arrival plus its TTFT
    target, minus what decode needs after the KV is in (loading it and the first step).
    Each chunk gets the time left in proportion to its share of the raw bytes left
    (:meth:`chunk_budget`: slack is spread over the chunks left rather than spent on one).
    With ``start`` (when the transfer began) the chunks also have a schedule: each is due
    when its share of the raw bytes, counted from the first chunk, has had its share of the
    time (:meth:`due`), so that decode can load layer by layer.
    """

    deadline: float
    total_raw_bytes: int
    sent_raw_bytes: int = 0
    start: float | None = None
    grace_s: float = 0.0
    """How late the whole KV may still be before a recompute (decode running the prefill
    itself) is the better way: :meth:`rest` counts it in."""

    @classmethod
    def from_ttft(cls, arrival: float, ttft_target_s: float, total_raw_bytes: int,
                  decode_reserve_s: float = 0.0) -> TransferDeadline:
        return cls(arrival + ttft_target_s - decode_reserve_s, total_raw_bytes, start=arrival)

    def chunk_budget(self, raw_bytes: int, now: float | None = None) -> float:
        """Seconds this chunk may take (≤ 0 when the deadline has passed)."""
        now = time.monotonic() if now is None else now
        left = self.deadline - now
        remaining = max(self.total_raw_bytes - self.sent_raw_bytes, raw_bytes)
        return left * raw_bytes / remaining if left > 0 else left

    def due(self, raw_bytes: int) -> float:
        """The instant by which the next chunk (of ``raw_bytes``) is due on the schedule;
        the deadline itself without a ``start``."""
        if self.start is None or self.total_raw_bytes <= 0:
            return self.deadline
        share = min(1.0, (self.sent_raw_bytes + raw_bytes) / self.total_raw_bytes)
        return self.start + (self.deadline - self.start) * share

    def rest(self, now: float | None = None) -> tuple[float, int]:
        """Seconds to the deadline (plus the grace) and raw bytes not yet sent (the next
        chunk's included)."""
        now = time.monotonic() if now is None else now
        return self.deadline + self.grace_s - now, max(self.total_raw_bytes - self.sent_raw_bytes, 0)

    def progress(self) -> float:
        """The fraction of the raw bytes sent (1.0 for an empty transfer)."""
        if self.total_raw_bytes <= 0:
            return 1.0
        return min(1.0, self.sent_raw_bytes / self.total_raw_bytes)

    def shift(self, seconds: float) -> None:
        """Move the whole schedule later (time the caller took out of the transfer's clock)."""
        self.deadline += seconds
        if self.start is not None:
            self.start += seconds

    def sent(self, raw_bytes: int) -> None:
        self.sent_raw_bytes += raw_bytes


@dataclass(frozen=True)
class Decision:
    """The form one chunk travels in, and why."""

    chunk: int
    level: str
    """``raw``, a codec level, or ``recompute``."""
    budget_s: float
    predicted_s: float
    bps: float | None
    reason: str


@dataclass
class LevelPolicy:
    """Chooses per chunk the best level that arrives in time (see the module docstring)."""

    model: CodecModel
    estimator: ThroughputEstimator = field(default_factory=ThroughputEstimator)
    levels: tuple[str, ...] = CODEC_LEVELS
    allow_raw: bool = True
    allow_recompute: bool = True
    start_level: str = "default"
    """Used for the first chunk when nothing is known of the link yet."""
    overlap: bool = False
    """The stream is pipelined (encode, wire and decode of successive chunks overlap)."""
    margin: float = 0.0
    """Safety margin: predictions take the link, and the encoding and decoding, as
    ``1 + margin`` times slower than measured (a shaped link's bursts, a busy machine's
    jitter: a chunk planned to the brim of its slot lands after it on the first stall)."""
    recompute_samples: int = 3
    """Acknowledged chunks measured before a recompute may be decided (it cannot be taken
    back; two stalled chunks on a busy machine are not a slow link)."""
    recompute_factor: float = 1.5
    """A recompute only when the fastest form, kept up for the rest, is projected to take
    this many times the time left (grace included): a near miss is sent, not given up."""
    recompute_until: float = 0.5
    """No recompute once this fraction of the raw bytes is sent: what is left, even late,
    is less work than the whole prefill a recompute does again."""
    starved_share: float = 0.5
    """No recompute while the recent encodings got less than this share of a core
    (:attr:`CodecModel.cpu_share`): the process is starved of CPU, and what it measures
    (an encoding's wall time, the wait for an acknowledgement) is the machine's, not the
    link's. It keeps sending at the fastest form, and judges again on clean figures."""
    on_decision: Callable[[Decision], None] | None = None
    """Called with every decision (the sidecar counts them in its metrics)."""
    name: str = "adaptive"

    def __post_init__(self) -> None:
        unknown = [lv for lv in self.levels if lv not in self.model.costs]
        if unknown:
            raise ValueError(f"no cost figures for levels {unknown}")
        if self.start_level not in self.levels:
            raise ValueError(f"start_level {self.start_level!r} is not one of {self.levels}")
        self._priors = {lv: dataclasses.replace(c) for lv, c in self.model.costs.items()}
        self.counts: dict[str, int] = {}
        self._last_level: str | None = None
        self._chunk = 0

    def options(self) -> list[str]:
        """Candidates, best quality first (raw ranks with lossless)."""
        return ([RAW] if self.allow_raw else []) + list(self.levels)

    def choose(self, raw_bytes: int, budget_s: float, *, queued_bytes: int = 0,
               queued_decode_s: float = 0.0, due_s: float | None = None,
               rest: tuple[float, int] | None = None, progress: float | None = None,
               recompute: bool = True) -> Decision:
        """The level for the next chunk of ``raw_bytes`` that may take ``budget_s``.

        ``queued_bytes``: bytes sent before it and not yet acknowledged (the chunk waits for
        them on the wire, on top of its budget); ``queued_decode_s``: the receiver's time to
        decode them (it acknowledges the next chunk only after). ``due_s``: seconds until the chunk is due
        on the transfer's schedule (its arrival must also be within them). ``rest``: seconds
        to the request's deadline and the raw bytes still to send, this chunk's included;
        ``progress``: the fraction of the transfer's raw bytes sent (None: unknown).
        When no level fits, the chunk goes at the fastest form (catching up: the best of
        those predicted within the margin of the soonest) unless a recompute is clearly the
        better way (:meth:`_keep_sending` says why not).
        Predictions take the link and the codec as ``1 + margin`` times slower than estimated.
        ``recompute=False``: the fastest form rather than a recompute (a chunk already due).
        """
        bps = self.estimator.bps
        if bps is None:
            decision = Decision(self._chunk, self.start_level, budget_s, math.nan, None,
                                "no throughput measured yet")
            return self._record(decision)
        safe_bps = bps / (1 + self.margin)
        wait = queued_bytes / safe_bps
        predicted = {lv: max(self._arrival(lv, raw_bytes, safe_bps, wait), wait + queued_decode_s)
                     for lv in self.options()}
        limit = budget_s + wait if due_s is None else min(budget_s + wait, due_s)
        exact = [lv for lv in predicted if lv in EXACT_LEVELS and predicted[lv] <= limit]
        if exact:
            level = min(exact, key=predicted.__getitem__)
            reason = ("encoding costs more than it saves" if level == RAW and "lossless" in predicted
                      else "exact form fits the budget")
            return self._record(Decision(self._chunk, level, budget_s, predicted[level], bps, reason))
        for level in self.levels:
            if predicted[level] <= limit:
                return self._record(Decision(self._chunk, level, budget_s, predicted[level], bps,
                                             "best level that fits the budget"))
        # the form that arrives soonest: raw on a fast link; on a busy machine the lowest
        # level's encoding may cost more than its fewer bytes save. Those whose own time
        # (after the wait for the chunk ahead, the same for all) is within the margin of
        # the soonest one's are as fast as the predictions can tell (a chunk that waits for
        # its encoding arrives no sooner for fewer bytes): the best of them goes
        own = {lv: predicted[lv] - wait for lv in predicted}
        soonest = min(own.values()) * (1 + self.margin)
        fastest = next(lv for lv in self.options() if own[lv] <= soonest)
        if rest is not None:
            keep = self._keep_sending(raw_bytes, queued_bytes, bps, rest, progress)
            if keep is not None:
                return self._record(Decision(self._chunk, fastest, budget_s, predicted[fastest],
                                             bps, f"behind schedule: {fastest} catches up "
                                                  f"({keep})"))
        if self.allow_recompute and recompute:
            return self._record(Decision(self._chunk, RECOMPUTE, budget_s, predicted[fastest], bps,
                                         f"even {fastest} misses the budget"))
        return self._record(Decision(self._chunk, fastest, budget_s, predicted[fastest], bps,
                                     "misses the budget; recompute not allowed"))

    def _keep_sending(self, raw_bytes: int, queued_bytes: int, bps: float,
                      rest: tuple[float, int], progress: float | None) -> str | None:
        """Why a chunk that fits no budget still goes rather than a recompute, or None when
        a recompute is the better way. A recompute costs decode a whole prefill and cannot
        be taken back, so it needs enough measured chunks, most of the KV still to send, a
        sender not starved of CPU, and the form fastest at the codec's own speed (its CPU
        time), kept up for the rest at the median of the recent rates (one stall is not a
        link), projected to miss the deadline and its grace by ``recompute_factor``."""
        if self.estimator.samples < self.recompute_samples:
            return f"{self.estimator.samples} chunks measured"
        if progress is not None and progress >= self.recompute_until:
            return f"{progress:.0%} of the KV sent"
        share = self.model.cpu_share
        if share is not None and share < self.starved_share:
            return f"the encodings got {share:.0%} of a core: starved, not a slow link"
        seconds_left, bytes_left = rest
        steady_bps = max(self.estimator.median_bps or bps, bps)
        steady = queued_bytes / steady_bps + min(
            self.model.predict(lv, max(bytes_left, raw_bytes), steady_bps, self._priors,
                               overlap=self.overlap, own_speed=True) for lv in self.options())
        if steady <= seconds_left * self.recompute_factor:
            return f"the rest projected at {steady * 1e3:.0f} ms for {seconds_left * 1e3:.0f} ms"
        return None

    def decode_s(self, level: str, raw_bytes: int) -> float:
        """Predicted seconds to decode a chunk of ``raw_bytes`` sent at ``level``."""
        if level not in self.model.costs:
            return 0.0
        return raw_bytes * self.model.stages(level, self._priors)[2]

    def revise(self, previous: Decision, raw_bytes: int, budget_s: float, *,
               drop: float = 3.0, **context) -> Decision | None:
        """Choose again for the chunk of ``previous`` (made while the chunk before it was
        on the wire, so as to encode meanwhile) when the acknowledgements since have
        brought the estimate below ``1 / drop`` of what it was then (a link slowing down,
        more than a busy machine's stall): a chunk chosen for a fast link and not sent yet
        is not put on a link that has just slowed down. Returns the new decision when its
        level differs (it replaces ``previous`` in the counts), else None; never a
        recompute (the chunk goes at the fastest form: a recompute waits for the next
        choice, on more than one slow sample). ``context``: as for :meth:`choose`."""
        bps = self.estimator.bps
        if previous.bps is None or bps is None or bps * drop > previous.bps:
            return None
        counts, chunk, last = dict(self.counts), self._chunk, self._last_level
        self._chunk = previous.chunk
        decision = self.choose(raw_bytes, budget_s, recompute=False, **context)
        self._chunk = chunk
        if decision.level == previous.level:
            self.counts, self._last_level = counts, last
            return None
        self.counts[previous.level] -= 1
        if not self.counts[previous.level]:
            del self.counts[previous.level]
        return dataclasses.replace(decision, reason=f"revised ({decision.reason})")

    def _arrival(self, level: str, raw_bytes: int, bps: float, wait: float) -> float:
        """Seconds until a chunk sent at ``level`` now is acknowledged, behind ``wait``
        seconds of bytes already on the wire (which its encoding overlaps when pipelined)."""
        cpu = 1 + self.margin
        if not self.overlap:
            return wait + self.model.predict(level, raw_bytes, bps, self._priors, cpu=cpu)
        if not wait:
            return self.model.predict(level, raw_bytes, bps, self._priors, overlap=True, cpu=cpu)
        encode, ratio, _ = self.model.stages(level, self._priors)
        return max(wait, raw_bytes * encode * cpu) + raw_bytes * ratio / bps

    def _record(self, decision: Decision) -> Decision:
        self._chunk += 1
        if self.on_decision is not None:
            self.on_decision(decision)
        self.counts[decision.level] = self.counts.get(decision.level, 0) + 1
        changed = decision.level != self._last_level
        log.log(logging.INFO if changed else logging.DEBUG,
                "%s: chunk %d -> %s (predicted %.1f ms, budget %.1f ms, link %s): %s",
                self.name, decision.chunk, decision.level, decision.predicted_s * 1e3,
                decision.budget_s * 1e3,
                "unknown" if decision.bps is None else f"{decision.bps * 8 / 1e6:.0f} Mbit/s",
                decision.reason)
        self._last_level = decision.level
        return decision
