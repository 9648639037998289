"""``kvpool fuzz codec``: fuzz the codec's decoder with atheris (libFuzzer) for a while.

The C++ extension carries no coverage instrumentation, so blind byte mutation would rarely
get past the frame's checksum and header. Each fuzz input is therefore read as a program:
pick one of a set of valid frames (every level, two dtypes, tiny and empty shapes), apply a
few edits (set, insert, delete, overwrite with a 32-bit value), then decode the result as
it is (the checksum must stop it) and re-sealed with a valid CRC32C (the C++ parser and
stream decoder must stop it). Anything but a clean decode or CodecError is a finding:
libFuzzer prints it, saves the input as ``crash-*`` and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["codec"], help="what to fuzz")
    parser.add_argument("--seconds", type=int, default=60, help="how long to run (default 60)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="corpus folder to grow and keep (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer seed (0: random)")


def seed_frames() -> list[bytes]:
    """Valid frames of every level, dtype and a few shapes (including empty ones)."""
    import numpy as np

    from kvpool.kernels import LEVELS, KVCache, encode

    rng = np.random.default_rng(7)
    frames = []
    for shapes in ([(24, 16), (9, 8)], [(70, 40)], [(0, 8), (1, 1)]):
        for dtype in (np.float16, np.float32):
            kv = KVCache(keys=[rng.standard_normal(s).astype(dtype) for s in shapes],
                         values=[rng.standard_normal(s).astype(dtype) for s in shapes])
            frames += [encode(kv, level) for level in LEVELS]
    return frames


def mutate(frames: list[bytes], data: bytes) -> bytes:
    """The frame (without checksum) that the fuzz input ``data`` describes."""
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    body = bytearray(frames[fdp.ConsumeIntInRange(0, len(frames) - 1)][:-4])
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        op = fdp.ConsumeIntInRange(0, 3)
        at = fdp.ConsumeIntInRange(0, len(body))
        if op == 0 and at < len(body):
            body[at] = fdp.ConsumeInt(1) & 0xFF
        elif op == 1:
            body[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        elif op == 2:
            del body[at : at + fdp.ConsumeIntInRange(1, 64)]
        else:
            body[at : at + 4] = fdp.ConsumeInt(4).to_bytes(4, "little", signed=True)
    return bytes(body)


def decode_both(body: bytes) -> None:
    """Decoding must succeed or raise CodecError, with its checksum broken or re-sealed."""
    import google_crc32c

    from kvpool.kernels import CodecError, decode

    for frame in (body, body + google_crc32c.value(body).to_bytes(4, "little")):
        try:
            decode(frame, threads=1)
        except CodecError:
            pass


def run(args: argparse.Namespace) -> int:
    import atheris

    with tempfile.TemporaryDirectory(prefix="kvpool-fuzz-") as tmp:
        corpus = args.corpus or Path(tmp)
        corpus.mkdir(parents=True, exist_ok=True)
        frames = seed_frames()
        argv = [sys.argv[0], f"-max_total_time={args.seconds}", "-rss_limit_mb=4096",
                f"-seed={args.seed}", "-print_final_stats=1", str(corpus)]
        atheris.Setup(argv, lambda data: decode_both(mutate(frames, data)))
        atheris.Fuzz()
    return 0
