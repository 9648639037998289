"""``kvpool profile``: build a model's codec profile from its real KV cache and save it.

The profile (the codec's probability tables for one model, :class:`kvpool.kernels.Profile`)
is built from the KV cache of ``--tokens`` tokens of real text and saved as
``<hash>.kvprofile`` under ``<user cache>/kvpool/profiles/<model>/`` or under ``--out``
(a directory, or a file name). The path is printed on stdout; the file's content hash is
its name, so a sender and a receiver agree on a profile by name alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from rich.console import Console

from kvpool import models
from kvpool.kernels import CodecError, Profile, sensitivity
from kvpool.kernels.realkv import LanguageModel, extract, load_model, model_name

SUFFIX = ".kvprofile"
SENSITIVITY_TOKENS = 128


def profiles_dir(model: str) -> Path:
    """Where profiles of ``model`` are kept by default."""
    return models.cache_dir() / "profiles" / model


def build_profile(
    model: LanguageModel,
    *,
    text: str | os.PathLike[str] | None = None,
    tokens: int = 2048,
    offset: int = 0,
) -> Profile:
    """The profile of ``model`` from the KV of ``tokens`` tokens of ``text`` from ``offset``,
    with the model's sensitivity measured over the next 128 tokens."""
    real = extract(model, text=text, tokens=tokens, next_tokens=SENSITIVITY_TOKENS,
                   offset=offset)
    return Profile.build([real.kv], model=model.name,
                         sensitivity=sensitivity.measure(real, positions=SENSITIVITY_TOKENS))


def save(profile: Profile, out: str | os.PathLike[str] | None = None) -> Path:
    """Save ``profile`` as ``<hash>.kvprofile`` in ``out`` (a directory) or at ``out`` (a file)."""
    if out is None:
        path = profiles_dir(profile.model) / f"{profile.hash}{SUFFIX}"
    else:
        out = Path(out)
        path = out / f"{profile.hash}{SUFFIX}" if out.is_dir() or str(out).endswith(os.sep) else out
    path.parent.mkdir(parents=True, exist_ok=True)
    profile.save(path)
    return path


def cached(model: str | os.PathLike[str] | None = None) -> Path:
    """The path of a profile of ``model`` (default: the embedded SmolLM2) in the user
    cache, built and saved first when none there can be read (about 40 s)."""
    folder = profiles_dir(model_name(model))
    for path in sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            Profile.load(path)
        except CodecError:
            continue  # another version, or a broken file: not this one
        return path
    return save(build_profile(load_model(model)))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=models.DEFAULT_MODEL, help="GGUF file of a decoder (default %(default)s)"
    )
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text (default: pydoc_data.topics)")
    parser.add_argument(
        "--tokens", type=int, default=2048, help="tokens of text (default %(default)s)"
    )
    parser.add_argument(
        "--offset", type=int, default=0, help="skip this many tokens of the text first"
    )
    parser.add_argument(
        "--out", metavar="PATH", help="directory or file to save to (default: the user cache)"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads for the model (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.torch_threads))
    console = Console(stderr=True)
    try:
        with console.status(f"running {args.model} over {args.tokens} tokens of text"):
            lm = load_model(args.model)
            profile = build_profile(lm, text=args.text, tokens=args.tokens, offset=args.offset)
        path = save(profile, args.out)
        Profile.load(path)  # what was written reads back
    except (models.ModelNotFound, ValueError, OSError) as exc:
        kind = "bad profile" if isinstance(exc, CodecError) else "error"
        print(f"kvpool profile: {kind}: {exc}", file=sys.stderr)
        return 2
    console.print(f"profile {profile.hash} of {profile.model}: {path.stat().st_size} bytes")
    print(path)
    return 0
