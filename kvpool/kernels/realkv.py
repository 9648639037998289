"""Real KV caches, offline: run a GGUF decoder on real text with torch on the CPU.

:func:`extract` tokenizes a text (the CPython documentation topics by default, or any
file), runs the model once over a prompt of ``tokens`` tokens and returns its per-layer
keys and values as a :class:`~kvpool.kernels.KVCache` (``[tokens_i, kv_heads * head_dim]``
per layer, keys after RoPE, exactly what a serving engine keeps), together with the model,
the transformers cache object and the text tokens that follow the prompt, which
:mod:`kvpool.kernels.quality` needs to measure what a lossy codec does to the model.

Any GGUF decoder that transformers loads works (llama, qwen2, gemma families); layers may
keep fewer tokens (sliding-window layers keep the last ``window - 1``) and have different
widths.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpool import models
from kvpool.kernels import KVCache

__all__ = ["LanguageModel", "RealKV", "cache_from_kv", "extract", "kv_of", "load_model", "text_ids"]


@dataclass
class LanguageModel:
    """A causal LM loaded with transformers on the CPU, and its tokenizer."""

    name: str
    lm: Any
    tokenizer: Any


@dataclass
class RealKV:
    """The KV cache of a real prompt and what is needed to continue from it."""

    model: LanguageModel
    prompt_ids: torch.Tensor
    """``[tokens]`` token ids of the prompt whose KV is in :attr:`kv`."""
    next_ids: torch.Tensor
    """``[m]`` the text's tokens right after the prompt (the real continuation)."""
    kv: KVCache
    """Per-layer keys and values in :attr:`dtype`, ``[tokens_i, width_i]``."""
    cache: Any
    """The transformers cache object the prompt produced (the template for rebuilding one)."""

    @property
    def tokens(self) -> int:
        return int(self.prompt_ids.numel())

    @property
    def fp16_bytes(self) -> int:
        """Size of the KV cache as 16-bit values: what a serving engine moves."""
        return 2 * sum(t.numel() for t in (*self.kv.keys, *self.kv.values))


def model_name(model: str | os.PathLike[str] | None) -> str:
    """A short name for reports: the default model's name, or the GGUF file's stem."""
    if model is None or str(model) == models.DEFAULT_MODEL:
        return models.DEFAULT_MODEL
    return Path(model).stem


def load_model(model: str | os.PathLike[str] | None = None) -> LanguageModel:
    """Load ``model`` (default SmolLM2-135M-Instruct) in float32 on the CPU, in eval mode.

    Raises :class:`kvpool.models.ModelNotFound` when the model package or file is missing.
    """
    lm, tokenizer = models.load_causal_lm(model, dtype=torch.float32)
    return LanguageModel(model_name(model), lm, tokenizer)


def text_ids(
    tokenizer: Any, count: int, text: str | os.PathLike[str] | None = None, *, offset: int = 0
) -> torch.Tensor:
    """``count`` token ids of real text starting at token ``offset``.

    ``text`` is a path to a UTF-8 file; ``None`` means :func:`kvpool.models.sample_text`.
    Raises :class:`ValueError` when the text is shorter than ``offset + count`` tokens.
    """
    need = offset + count
    if text is None:
        # About four characters per token in English; ask for generous margin.
        body = models.sample_text(min_chars=8 * need + 4096)
        source = "the sample text (pydoc_data.topics)"
    else:
        path = Path(text)
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read text file {path}: {exc}") from exc
        source = str(path)
    ids = tokenizer(body, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < need:
        raise ValueError(
            f"{source} has {ids.numel()} tokens; {need} are needed "
            f"({offset} skipped + {count} used): give a longer text or fewer --tokens"
        )
    return ids[offset:need].clone()


@torch.inference_mode()
def kv_of(
    model: LanguageModel, ids: torch.Tensor, dtype: torch.dtype = torch.float16
) -> tuple[KVCache, Any]:
    """Run ``model`` over ``ids`` (1-D) and return ``(KVCache in dtype, transformers cache)``."""
    out = model.lm(ids[None, :], use_cache=True)
    cache = out.past_key_values
    keys, values = [], []
    for layer in cache.layers:
        keys.append(_flatten(layer.keys).to(dtype))
        values.append(_flatten(layer.values).to(dtype))
    return KVCache(keys=keys, values=values), cache


def _flatten(t: torch.Tensor) -> torch.Tensor:
    """``[1, heads, tokens, head_dim]`` -> ``[tokens, heads * head_dim]`` (contiguous)."""
    _, heads, tokens, head_dim = t.shape
    return t[0].transpose(0, 1).reshape(tokens, heads * head_dim).contiguous()


def _unflatten(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_flatten`, shaped and typed like the cache tensor ``like``."""
    _, heads, tokens, head_dim = like.shape
    if tuple(t.shape) != (tokens, heads * head_dim):
        raise ValueError(
            f"KV layer of shape {tuple(t.shape)} where {(tokens, heads * head_dim)} is expected"
        )
    t = torch.as_tensor(t).to(device=like.device, dtype=like.dtype)
    return t.reshape(tokens, heads, head_dim).transpose(0, 1)[None].contiguous()


def cache_from_kv(template: Any, kv: KVCache) -> Any:
    """A transformers cache equal to ``template`` but holding the keys and values of ``kv``.

    Everything else (layer types, sliding-window bookkeeping, positions seen) is copied from
    the template, so the model continues at the right RoPE positions: the keys in ``kv`` are
    post-RoPE, exactly as the template holds them.
    """
    if len(kv.keys) != len(template.layers) or len(kv.values) != len(template.layers):
        raise ValueError(f"KV cache has {len(kv.keys)} layers, the model {len(template.layers)}")
    memo: dict[int, Any] = {}
    for layer, k, v in zip(template.layers, kv.keys, kv.values):
        memo[id(layer.keys)] = _unflatten(k, layer.keys)
        memo[id(layer.values)] = _unflatten(v, layer.values)
    return copy.deepcopy(template, memo)


def extract(
    model: str | os.PathLike[str] | LanguageModel | None = None,
    *,
    text: str | os.PathLike[str] | None = None,
    tokens: int = 2048,
    next_tokens: int = 257,
    offset: int = 0,
    dtype: torch.dtype = torch.float16,
) -> RealKV:
    """The KV cache of ``tokens`` tokens of real text (from token ``offset``) and the
    ``next_tokens`` tokens that follow it."""
    if tokens < 1:
        raise ValueError(f"tokens must be positive, not {tokens}")
    lm = model if isinstance(model, LanguageModel) else load_model(model)
    ids = text_ids(lm.tokenizer, tokens + next_tokens, text, offset=offset)
    prompt, following = ids[:tokens], ids[tokens:]
    kv, cache = kv_of(lm, prompt, dtype)
    return RealKV(model=lm, prompt_ids=prompt, next_ids=following, kv=kv, cache=cache)
