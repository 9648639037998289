"""Compression levels of the codec, as data.

A level names a quantizer: for each layer, how many bins the keys and the values get
(anchor rows of each token group and the other rows separately), as a schedule over the
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


@dataclass(frozen=True)
class Level:
    """One named level: the quantizer's bins per layer, or lossless."""

    name: str
    """Name carried in every chunk's header (at most 32 printable ASCII characters)."""
    lossless: bool = False
    """Code the raw 16/32-bit values; the round trip is bit-exact."""
    anchor_group: int = 16
    """Tokens per group; the first is the anchor, the others are coded as differences to
    its decoded value (1 = no differences, every row an anchor)."""
    key_bins: Schedule = ()
    """Bins of the keys' non-anchor rows over the depth."""
    value_bins: Schedule = ()
    """Bins of the values' non-anchor rows over the depth."""
    key_anchor_bins: Schedule = ()
    """Bins of the keys' anchor rows."""
    value_anchor_bins: Schedule = ()
    """Bins of the values' anchor rows."""

    def layer_bins(self, layer: int, n_layers: int) -> tuple[int, int, int, int]:
        """``(key bins, value bins, key anchor bins, value anchor bins)`` of one layer, as
        the header stores them (zeros for lossless; non-anchor bins 0 when there are no
        non-anchor rows)."""
        if self.lossless:
            return (0, 0, 0, 0)
        depth = layer / max(n_layers, 1)
        kb, vb = _pick(self.key_bins, depth), _pick(self.value_bins, depth)
        if self.anchor_group == 1:
            kb = vb = 0
        return (kb, vb, _pick(self.key_anchor_bins, depth), _pick(self.value_anchor_bins, depth))

    def all_bins(self) -> set[tuple[str, int]]:
        """Every (role, bins) this level can use: role "a" for anchor rows, "d" for others."""
        out = {("a", b) for s in (self.key_anchor_bins, self.value_anchor_bins) for _, b in s}
        if self.anchor_group > 1:
            out |= {("d", b) for s in (self.key_bins, self.value_bins) for _, b in s}
        return out


def _pick(schedule: Schedule, depth: float) -> int:
    for bound, bins in schedule:
        if depth < bound:
            return bins
    return schedule[-1][1]


LEVEL_TABLE: tuple[Level, ...] = (
    Level("lossless", lossless=True, anchor_group=1),
    Level(
        "high",
        key_bins=((0.15, 31), (1.0, 15)),
        value_bins=((0.15, 15), (1.0, 11)),
        key_anchor_bins=((1.0, 63),),
        value_anchor_bins=((1.0, 31),),
    ),
    Level(
        "default",
        key_bins=((0.15, 15), (1.0, 11)),
        value_bins=((0.15, 11), (1.0, 7)),
        key_anchor_bins=((1.0, 31),),
        value_anchor_bins=((1.0, 15),),
    ),
    Level(
        "low",
        key_bins=((0.15, 11), (1.0, 7)),
        value_bins=((0.15, 7), (1.0, 5)),
        key_anchor_bins=((1.0, 15),),
        value_anchor_bins=((1.0, 11),),
    ),
    Level(
        "lowest",
        key_bins=((0.15, 7), (1.0, 5)),
        value_bins=((1.0, 3),),
        key_anchor_bins=((1.0, 11),),
        value_anchor_bins=((1.0, 7),),
    ),
)
"""Every level, best quality first."""

LEVELS: tuple[str, ...] = tuple(level.name for level in LEVEL_TABLE)


def get(name: str) -> Level:
    """The level called ``name`` (CodecError for an unknown name)."""
    for level in LEVEL_TABLE:
        if level.name == name:
            return level
    raise CodecError(f"unknown level {name!r}; levels are {', '.join(LEVELS)}")


def _check(level: Level) -> None:
    if not 1 <= level.anchor_group <= BLOCK_TOKENS or BLOCK_TOKENS % level.anchor_group:
        raise ValueError(f"level {level.name}: anchor_group must divide {BLOCK_TOKENS}")
    if level.lossless:
        return
    schedules = (level.key_bins, level.value_bins, level.key_anchor_bins, level.value_anchor_bins)
    for schedule in schedules:
        if not schedule or schedule[-1][0] != 1.0:
            raise ValueError(f"level {level.name}: a schedule must end at depth 1.0")
        for _, bins in schedule:
            if not (3 <= bins <= 255 and bins % 2):
                raise ValueError(f"level {level.name}: bins must be odd in 3..255, not {bins}")


for _level in LEVEL_TABLE:
    _check(_level)
