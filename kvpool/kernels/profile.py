"""Model profiles: the codec's channel statistics and probability tables for one model.

A profile is computed once from real KV caches of a model and identified by a content
hash; a chunk encoded with it names the hash (16 bytes) instead of carrying its tables.
For every plane (layer-major, keys before values) it holds the channel midpoints and half
ranges (bf16 bits) and, for every anchor group and bins a level table uses, one 16-bit
probability table per channel for anchor rows ("a") and other rows ("d"), and with anchor
group 1 also five per channel ("x"), one per context: the symbol the channel had in the row
above (docs/bitstream.md); chunks encoded with the profile use those.

A profile may also hold the model's *sensitivity*: per plane, how much the model's output
moves (KL divergence) when that plane is quantized coarsely (:mod:`kvpool.kernels.sensitivity`).
Encoding with such a profile moves every level's bins along the ladder, finer on the planes
the model is most sensitive to and coarser on the others, as rate-distortion theory
allocates bits (:meth:`Profile.steps`); the bins land in each chunk's header as always.

File format (version 2): a numpy ``.npz`` archive (no pickles) with ``meta`` (UTF-8 JSON:
format, version, model, planes, widths, hash), arrays ``p{plane}.mu``, ``p{plane}.sigma``
and ``p{plane}.{role}{bins}g{group}`` ([width, bins] uint16), and optionally
``sensitivity`` ([planes] float32). The hash is SHA-256 over the canonical JSON of the model
and widths and every array's name, shape and bytes in sorted order, cut to 16 bytes.
``x`` tables are [width * 5, bins], context-major within a channel.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kvpool.kernels import _codec, levels
from kvpool.kernels.codec import KVCache, _planes
from kvpool.kernels.errors import CodecError

ROBUST = 0.001
"""Quantiles that bound a channel's range in a profile (0.1 % and 99.9 %)."""

FORMAT = "kvpool-codec-profile"
VERSION = 2
"""2: tables up to three ladder steps from every level's bins, and context tables."""

COMPILED_CACHE_BYTES = 96 << 20
"""Bytes of compiled tables a profile keeps (:meth:`Profile.compiled`): a whole-model frame
of SmolLM2 at ``default`` takes about 20 MB, one layer's chunk 1/30 of that."""


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    t = x.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    return t.numpy()


def _bf16_bits(x: np.ndarray, up: bool = False) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if up:
        return ((bits >> 16) + ((bits & 0xFFFF) != 0)).astype(np.uint16)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _table_key(role: str, bins: int, group: int) -> str:
    return f"{role}{bins}g{group}"


CONTEXTS = 5
"""Tables per channel when the symbol above chooses the table (docs/bitstream.md)."""

CONTEXT_MAX_BINS = 63
"""Context tables are kept up to these bins (they take five times the room of the others;
finer planes gain least from them)."""


def contexts_of(sym: np.ndarray, bins: int) -> np.ndarray:
    """Context of every symbol of a plane ([tokens, width]) coded in streams of
    :data:`levels.BLOCK_TOKENS` rows: the symbol above it, as -2 or less, -1, 0, 1, 2 or
    more (0..4), and 2 in a stream's first row; the codec's ``context_of``."""
    ctx = np.full(sym.shape, CONTEXTS // 2, np.int64)
    ctx[1:] = np.clip(sym[:-1].astype(np.int64) - bins // 2, -2, 2) + 2
    ctx[::levels.BLOCK_TOKENS] = CONTEXTS // 2
    return ctx


def _count(table: np.ndarray, sym: np.ndarray, tables: int, bins: int) -> np.ndarray:
    """Counts [tables, bins] of ``sym`` coded with the table index ``table`` (broadcast)."""
    flat = (table * bins + sym).ravel()
    return np.bincount(flat, minlength=tables * bins).reshape(tables, bins).astype(np.uint64)


class Profile:
    """Probability tables for one model, identified by a content hash."""

    def __init__(self, model: str, arrays: dict[str, np.ndarray], widths: list[int]):
        self.model = model
        self.widths = list(widths)
        self._arrays = arrays
        sens = arrays.get("sensitivity")
        if sens is not None and (sens.dtype != np.float32 or sens.shape != (len(self.widths),)
                                 or not np.all(np.isfinite(sens))):
            raise CodecError("a profile's sensitivity is one finite float32 per plane")
        self.hash = self._content_hash()
        self._compiled: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._compiled_bytes = 0
        self._compiled_lock = threading.Lock()

    @property
    def sensitivity(self) -> np.ndarray | None:
        """Per plane, the KL divergence the model showed with that plane coarsely quantized."""
        return self._arrays.get("sensitivity")

    def steps(self, level: levels.Level | None = None) -> list[int]:
        """Per plane, the ladder steps its bins move under ``level`` (all 0 without a
        sensitivity).

        Rate-distortion allocation: a plane's share of the output error is its sensitivity
        scaled from the probe's bins to the level's (errors grow with the square of the
        quantization step), and the error is least for a given size when every plane's step
        is proportional to the square root of its share, i.e. when its bins move one ladder
        step (about 1.4x, half a bit) per doubling of its share over the planes' geometric
        mean, up to :data:`levels.REACH` steps either way. The moves add up to about zero,
        so the chunk's size stays near the level's own.
        """
        sens = self.sensitivity
        n = len(self.widths) // 2
        if sens is None or not len(sens) or len(sens) != 2 * n:
            return [0] * len(self.widths)
        probe = levels.get(levels.PROBE)
        share = np.maximum(sens.astype(np.float64), max(float(sens.max()), 1e-12) * 1e-3)
        if level is not None and not level.lossless:
            for i in range(n):
                pb, lb = probe.layer_bins(i, n)[2:], level.layer_bins(i, n)[2:]
                for side in (0, 1):
                    share[2 * i + side] *= ((pb[side] - 1) / (lb[side] - 1)) ** 2
        octaves = np.log2(share)
        steps = np.clip(np.round(octaves - octaves.mean()), -levels.REACH, levels.REACH)
        return [int(x) for x in steps]

    @property
    def hash_bytes(self) -> bytes:
        return bytes.fromhex(self.hash)

    def _content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"model": self.model, "widths": self.widths}, sort_keys=True).encode())
        for name in sorted(self._arrays):
            a = self._arrays[name]
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:32]

    @classmethod
    def build(
        cls,
        samples: Iterable[KVCache],
        *,
        model: str,
        position: int = 0,
        sensitivity: Any = None,
    ) -> Profile:
        """Statistics and tables from real KV caches of ``model`` (every lossy level).

        ``position`` is the sequence position of the samples' first token: rows of the
        sequence's first tokens, which the levels keep exact (``sink_tokens``), are left out.
        ``sensitivity`` (one figure per plane, :mod:`kvpool.kernels.sensitivity`) lets the
        profile move bins towards the planes that matter.
        """
        skip = max(0, max(lv.sink_tokens for lv in levels.LEVEL_TABLE) - position)
        per_plane: list[list[np.ndarray]] | None = None
        for kv in samples:
            planes = [_to_numpy(p).astype(np.float32)[skip:] for p in _planes(kv)]
            if per_plane is None:
                per_plane = [[] for _ in planes]
            if len(planes) != len(per_plane):
                raise CodecError("samples of one profile must have the same layers")
            for i, p in enumerate(planes):
                if per_plane[i] and per_plane[i][0].shape[1] != p.shape[1]:
                    raise CodecError(f"plane {i}: widths differ between samples")
                per_plane[i].append(p)
        if not per_plane:
            raise CodecError("a profile needs at least one sample")
        arrays: dict[str, np.ndarray] = {}
        widths = []
        roles = sorted({(lv.anchor_group, role, bins) for lv in levels.LEVEL_TABLE
                        if not lv.lossless for role, bins in lv.all_bins()})
        for i, xs in enumerate(per_plane):
            data = np.concatenate(xs)
            width = data.shape[1]
            widths.append(width)
            if len(data):
                # Robust ranges: a rare outlier token (an attention sink) must not widen a
                # channel for every chunk; rows beyond the range get a larger token scale.
                lo, hi = np.quantile(data, [ROBUST, 1 - ROBUST], axis=0).astype(np.float32)
            else:
                lo = hi = np.zeros(width, np.float32)
            mu = _bf16_bits(hi * 0.5 + lo * 0.5)
            m = (mu.astype(np.uint32) << 16).view(np.float32)
            half = np.maximum(hi - m, m - lo)
            sigma = np.where(half > 0, _bf16_bits(half, up=True), np.uint16(0x3F80))
            arrays[f"p{i}.mu"], arrays[f"p{i}.sigma"] = mu, sigma.astype(np.uint16)
            for group, role, bins in roles:
                counts = np.zeros((width, bins), np.uint64)
                in_context = np.zeros((width * CONTEXTS, bins), np.uint64)
                for x in xs:
                    if not len(x):
                        continue
                    sym = _codec.symbols(x, mu, arrays[f"p{i}.sigma"], group, bins, bins)
                    rows = (np.arange(len(x)) % group == 0) == (role == "a")
                    sel = sym[rows].astype(np.int64)
                    counts += _count(np.arange(width)[None, :], sel, width, bins)
                    if group == 1 and bins <= CONTEXT_MAX_BINS:
                        ctx = contexts_of(sym, bins)
                        in_context += _count(np.arange(width) * CONTEXTS + ctx, sel,
                                             width * CONTEXTS, bins)
                arrays[f"p{i}.{_table_key(role, bins, group)}"] = _codec.normalize(counts)
                if group == 1 and bins <= CONTEXT_MAX_BINS:
                    arrays[f"p{i}.{_table_key('x', bins, group)}"] = _codec.normalize(in_context)
        if sensitivity is not None:
            arrays["sensitivity"] = np.asarray(sensitivity, dtype=np.float32).reshape(-1)
        return cls(model, arrays, widths)

    def slice_hash(self, first: int, count: int) -> str:
        """The hash a chunk of the model's layers ``[first, first + count)`` names: the
        profile's own for all of them, else one derived from it and the range (a chunk of
        one layer, as the sidecar sends them, decodes with that layer's tables)."""
        if first == 0 and 2 * count == len(self.widths):
            return self.hash
        return hashlib.sha256(f"{self.hash}/{first}+{count}".encode()).hexdigest()[:32]

    def locate(self, want: str, count: int) -> int | None:
        """The first layer of the slice of ``count`` layers whose hash is ``want`` (None when
        no slice of this profile has it)."""
        for first in range(len(self.widths) // 2 - count + 1):
            if self.slice_hash(first, count) == want:
                return first
        return None

    def has_contexts(self, layers: list[tuple[int, ...]], first: int = 0) -> bool:
        """Whether the profile holds context tables (:data:`CONTEXTS` per channel) for every
        plane's bins (layers from ``first``); profiles built before they existed do not."""
        return all(f"p{2 * (first + i) + kind}.{_table_key('x', bins, 1)}" in self._arrays
                   for i, (*_, kab, vab) in enumerate(layers)
                   for kind, bins in enumerate((kab, vab)))

    def tables_for(self, anchor_group: int, layers: list[tuple[int, ...]],
                   contexts: bool = False, first: int = 0) -> list[tuple]:
        """Per plane of ``layers`` (the model's layers from ``first``), what the extension
        takes: (mu, sigma, anchor tables, other tables); with ``contexts`` the anchor tables
        are the context tables ([width * CONTEXTS, bins])."""
        n = len(self.widths) // 2
        if first < 0 or first + len(layers) > n:
            raise CodecError(f"profile {self.hash} is for {n} layers, not layers "
                             f"{first}..{first + len(layers) - 1}")
        out = []
        for i, (_, width, kb, vb, kab, vab) in enumerate(layers):
            for kind, (bins, abins) in enumerate(((kb, kab), (vb, vab))):
                p = 2 * (first + i) + kind
                if self.widths[p] != width:
                    raise CodecError(f"profile {self.hash}: plane {p} is {self.widths[p]} wide, "
                                     f"the chunk's {width}")
                anchor = self._table(p, "x" if contexts else "a", abins, anchor_group)
                delta = self._table(p, "d", bins, anchor_group) if anchor_group > 1 else None
                out.append((self._arrays[f"p{p}.mu"], self._arrays[f"p{p}.sigma"], anchor, delta))
        return out

    def compiled(self, anchor_group: int, layers: list[tuple[int, ...]], contexts: bool,
                 first: int) -> Any:
        """The tables of :meth:`tables_for` built into the form the coder reads, for
        frames of this layout (tokens aside). Built once and kept (least recently used
        first out, up to :data:`COMPILED_CACHE_BYTES`): a frame then spends nothing on its
        tables, where building them took about as long as decoding a one-layer chunk. The
        CUDA path uploads them to the GPU once and keeps that copy with them."""
        shapes = tuple(tuple(layer[1:]) for layer in layers)
        key = (anchor_group, contexts, first, shapes)
        with self._compiled_lock:
            table = self._compiled.get(key)
            if table is not None:
                self._compiled.move_to_end(key)
                return table
        table = _codec.compile(
            [(1, *shape) for shape in shapes], levels.BLOCK_TOKENS, levels.GROUP_CHANNELS,
            anchor_group, contexts, bytes.fromhex(self.slice_hash(first, len(layers))),
            self.tables_for(anchor_group, list(layers), contexts, first))
        with self._compiled_lock:
            if key not in self._compiled:
                self._compiled[key] = table
                self._compiled_bytes += table.nbytes
            while self._compiled_bytes > COMPILED_CACHE_BYTES and len(self._compiled) > 1:
                _, old = self._compiled.popitem(last=False)
                self._compiled_bytes -= old.nbytes
            return self._compiled[key]

    def _table(self, plane: int, role: str, bins: int, group: int) -> np.ndarray:
        key = f"p{plane}.{_table_key(role, bins, group)}"
        if key not in self._arrays:
            raise CodecError(f"profile {self.hash} has no table for {bins} bins, anchor group "
                             f"{group}: rebuild it for the current levels")
        return self._arrays[key]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile file (atomically: a crash leaves the old file or none)."""
        meta = {"format": FORMAT, "version": VERSION, "model": self.model,
                "widths": self.widths, "hash": self.hash}
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **self._arrays)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read a profile file; CodecError when it is corrupt, of another version, or its
        content does not match its hash."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("meta").tobytes().decode())
        except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as exc:
            raise CodecError(f"corrupt profile file {path}: {exc}") from exc
        except Exception as exc:  # zipfile.BadZipFile and friends
            raise CodecError(f"corrupt profile file {path}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CodecError(f"{path} is not a codec profile")
        if meta.get("version") != VERSION:
            raise CodecError(f"{path}: profile version {meta.get('version')}, expected {VERSION}")
        for name, a in arrays.items():
            if name == "sensitivity":
                continue  # checked by the constructor
            if a.dtype != np.uint16 or not name.startswith("p"):
                raise CodecError(f"corrupt profile file {path}: array {name}")
        try:
            profile = cls(str(meta["model"]), arrays, [int(w) for w in meta["widths"]])
        except (KeyError, TypeError, ValueError, CodecError) as exc:
            raise CodecError(f"corrupt profile file {path}: {exc}") from exc
        if profile.hash != meta.get("hash"):
            raise CodecError(f"corrupt profile file {path}: content does not match its hash")
        return profile

    def __repr__(self) -> str:
        return f"Profile(model={self.model!r}, hash={self.hash}, planes={len(self.widths)})"
