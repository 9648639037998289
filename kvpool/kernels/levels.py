"""Compression levels of the codec, as data.

A level names a quantizer: for each layer, how many bins the keys and the values get
(and, with anchor groups, the differences to the anchor row), as a schedule over the
depth of the model, so one table serves models with any number of layers. Bins are odd
(2h + 1 symbols, zero is exact) and between 3 and 255. ``lossless`` codes the raw values.

Tuning the codec is editing :data:`LEVEL_TABLE`; the C++ core receives the bins per layer
in every chunk's header and has no table of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpool.kernels.errors import CodecError

Schedule = tuple[tuple[float, int], ...]
"""``((depth, bins), ...)``: layer ``i`` of ``n`` takes the bins of the first entry with
``i / n < depth``; the last entry's depth must be 1.0."""

BLOCK_TOKENS = 64
"""Tokens per stream (and the largest run a decoder thread codes alone); a multiple of
every level's anchor group."""

GROUP_CHANNELS = 64
"""Channels per stream (at most 256). 64 x 64 symbols per stream keep the per-stream
overhead (8 bytes of state, 4 of size) near 1 % and give a GPU thousands of streams."""


BIN_LADDER: tuple[int, ...] = (3, 5, 7, 9, 11, 15, 21, 31, 43, 63, 91, 127, 181, 255)
"""Bins a profile may move a plane to, finer where the model is sensitive to errors and
coarser where it is not; one step is about half a bit per value."""

REACH = 3
"""How many ladder steps a profile may move a plane's bins either way."""


def shifted(bins: int, steps: int) -> int:
    """``bins`` moved ``steps`` along :data:`BIN_LADDER` (bins off the ladder stay)."""
    if not steps or bins not in BIN_LADDER:
        return bins
    i = min(max(BIN_LADDER.index(bins) + steps, 0), len(BIN_LADDER) - 1)
    return BIN_LADDER[i]


@dataclass(frozen=True)
class Level:
    """One named level: the quantizer's bins per layer, or lossless."""

    name: str
    """Name carried in every chunk's header (at most 32 printable ASCII characters)."""
    lossless: bool = False
    """Code the raw 16/32-bit values; the round trip is bit-exact."""
    key_bins: Schedule = ()
    """Bins of the keys over the depth (of the anchor rows when ``anchor_group > 1``)."""
    value_bins: Schedule = ()
    """Bins of the values over the depth (of the anchor rows when ``anchor_group > 1``)."""
    anchor_group: int = 1
    """Tokens per group: the first (anchor) row is coded as it is, the others as differences
    to its decoded value, with the ``*_delta_bins``. 1 = every row on its own."""
    key_delta_bins: Schedule = ()
    """Bins of the keys' non-anchor rows (only when ``anchor_group > 1``)."""
    value_delta_bins: Schedule = ()
    """Bins of the values' non-anchor rows (only when ``anchor_group > 1``)."""
    sink_tokens: int = 0
    """The first tokens of a sequence are kept exact (stored verbatim, not quantized): the
    model's attention sinks, which most heads attend to heavily, so that their errors weigh on
    every later token (at most 255)."""

    def layer_bins(
        self, layer: int, n_layers: int, steps: tuple[int, int] = (0, 0)
    ) -> tuple[int, int, int, int]:
        """``(key bins, value bins, key anchor bins, value anchor bins)`` of one layer in the
        header's order: non-anchor rows first (0 when ``anchor_group == 1``), then anchor
        rows; all zeros for lossless. ``steps`` moves the keys' and the values' bins along
        :data:`BIN_LADDER` (a profile's allocation by sensitivity)."""
        if self.lossless:
            return (0, 0, 0, 0)
        depth = layer / max(n_layers, 1)
        ks, vs = steps
        anchor = (shifted(_pick(self.key_bins, depth), ks),
                  shifted(_pick(self.value_bins, depth), vs))
        if self.anchor_group == 1:
            return (0, 0, *anchor)
        return (shifted(_pick(self.key_delta_bins, depth), ks),
                shifted(_pick(self.value_delta_bins, depth), vs), *anchor)

    def all_bins(self, neighbours: bool = True) -> set[tuple[str, int]]:
        """Every (role, bins) this level can use, with ``neighbours`` up to :data:`REACH`
        ladder steps either way included: role "a" for anchor rows (every row when
        ``anchor_group == 1``), "d" for the others."""
        out = {("a", b) for s in (self.key_bins, self.value_bins) for _, b in s}
        if self.anchor_group > 1:
            out |= {("d", b) for s in (self.key_delta_bins, self.value_delta_bins) for _, b in s}
        steps = range(-REACH, REACH + 1) if neighbours else (0,)
        return {(role, shifted(b, step)) for role, b in out for step in steps}


def _pick(schedule: Schedule, depth: float) -> int:
    for bound, bins in schedule:
        if depth < bound:
            return bins
    return schedule[-1][1]


# Measured with ``kvpool bench codec`` on SmolLM2-135M (2048 tokens of pydoc text, a profile
# with the model's sensitivity from other text; KL = mean KL divergence of the next-token
# distributions over 256 positions, the steady quality figure). What shaped the table:
# - The sequence's first tokens (attention sinks) must stay exact: at 31/15 bins, KL 0.038
#   with the sinks quantized against 0.006 with four sinks exact.
# - With exact sinks, every row on its own beats rows coded as differences to a 16-token
#   anchor row (post-RoPE keys of neighbouring tokens differ in their fast-rotating
#   channels): at ratio 5.0, KL 0.021 against 0.036.
# - A profile's sensitivity (kvpool.kernels.sensitivity) moves bins to the planes that
#   matter, one ladder step per doubling of a plane's share of the error (Profile.steps): at
#   keys 21 / values 11, KL 0.0073 with the planes' top and bottom thirds moved one step,
#   0.0048 with that allocation, at the same size.
# - A profile's context tables (the symbol above chooses the table) shrink chunks by 4 %
#   at the same quality.
# With a profile (256-token chunks):
#   high     keys 63, values 31 bins            ratio 3.2, KL 0.0006
#   default  keys 21, values 11                 ratio 4.7, KL 0.005, perplexity +0.3 %
#   low      keys 15, values 11                 ratio 5.1, KL 0.009, perplexity +1.1 %
#   lowest   keys 9, values 7 (15 / 11 in the first 10 % of the layers)    ratio 7.1, KL 0.044
SINKS = 4
LEVEL_TABLE: tuple[Level, ...] = (
    Level("lossless", lossless=True),
    Level("high", key_bins=((1.0, 63),), value_bins=((1.0, 31),), sink_tokens=SINKS),
    Level("default", key_bins=((1.0, 21),), value_bins=((1.0, 11),), sink_tokens=SINKS),
    Level("low", key_bins=((1.0, 15),), value_bins=((1.0, 11),), sink_tokens=SINKS),
    Level("lowest", key_bins=((0.1, 15), (1.0, 9)), value_bins=((0.1, 11), (1.0, 7)),
          sink_tokens=SINKS),
)
"""Every level, best quality first."""

LEVELS: tuple[str, ...] = tuple(level.name for level in LEVEL_TABLE)

PROBE = LEVELS[-1]
"""The coarsest level: a profile's sensitivity is the model's response to its errors."""


def get(name: str) -> Level:
    """The level called ``name`` (CodecError for an unknown name)."""
    for level in LEVEL_TABLE:
        if level.name == name:
            return level
    raise CodecError(f"unknown level {name!r}; levels are {', '.join(LEVELS)}")


def _check(level: Level) -> None:
    if not 0 <= level.sink_tokens <= 255 or (level.lossless and level.sink_tokens):
        raise ValueError(f"level {level.name}: sink_tokens must be in 0..255 (0 when lossless)")
    if not 1 <= level.anchor_group <= BLOCK_TOKENS or BLOCK_TOKENS % level.anchor_group:
        raise ValueError(f"level {level.name}: anchor_group must divide {BLOCK_TOKENS}")
    if level.lossless:
        return
    schedules = [level.key_bins, level.value_bins]
    if level.anchor_group > 1:
        schedules += [level.key_delta_bins, level.value_delta_bins]
    for schedule in schedules:
        if not schedule or schedule[-1][0] != 1.0:
            raise ValueError(f"level {level.name}: a schedule must end at depth 1.0")
        for _, bins in schedule:
            if not (3 <= bins <= 255 and bins % 2):
                raise ValueError(f"level {level.name}: bins must be odd in 3..255, not {bins}")


for _level in LEVEL_TABLE:
    _check(_level)
