"""Token-level prefix maths: what a block-based prefix cache can reuse.

vLLM v1's rule (``kv_cache_manager.get_computed_blocks``), which every request on this
project is checked against:

* only *full* blocks of ``block_size`` tokens are cached;
* blocks are hashed in a chain, so a block matches only if every block before it matches:
  the reusable part of a prompt is a prefix, never a piece from the middle;
* the last prompt token is always recomputed (the engine needs its logits).

So for a prompt of ``L`` tokens whose longest common token prefix with anything cached is
``P``, the engine serves ``B * floor(min(P, L - 1) / B)`` tokens from cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def cached_tokens_for(prompt_len: int, common_prefix: int, block_size: int) -> int:
    """Tokens a block cache serves for a prompt of ``prompt_len`` sharing ``common_prefix``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if prompt_len <= 0:
        return 0
    reusable = min(common_prefix, prompt_len - 1)
    return block_size * (reusable // block_size)


@dataclass(frozen=True)
class Prediction:
    """The harness's claim about one request, made before the engine answers."""

    prompt_tokens: int
    common_prefix: int  # == first divergence: index of the first token not in the cache
    cached_tokens: int
    source: int | None  # which earlier sequence (in order seen) shares that prefix


class PrefixCacheModel:
    """What an engine with automatic prefix caching holds since its last reset.

    It remembers every token sequence whose KV the engine computed (the prompt, plus the
    generated tokens but the last: the last sampled token's KV is never computed) and
    predicts, for a new prompt, how much of it the engine can reuse. It assumes nothing was
    evicted; the engine's own count shows when that assumption fails.
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._seen: list[tuple[int, ...]] = []

    def reset(self) -> None:
        self._seen.clear()

    @property
    def sequences(self) -> list[tuple[int, ...]]:
        return list(self._seen)

    def predict(self, prompt: Sequence[int]) -> Prediction:
        best, source = 0, None
        for i, seen in enumerate(self._seen):
            n = common_prefix_len(prompt, seen)
            if n > best:
                best, source = n, i
        cached = cached_tokens_for(len(prompt), best, self.block_size)
        return Prediction(len(prompt), best, cached, source)

    def record(self, prompt: Sequence[int], output: Sequence[int] = ()) -> None:
        """Remember a finished request: its prompt and all generated tokens but the last."""
        computed = tuple(prompt) + tuple(output[:-1])
        self._seen.append(computed)


@dataclass(frozen=True)
class Divergence:
    """Where a prompt leaves the cached prefix, as text a person can read."""

    index: int  # token index of the first token not shared (== prompt length: none)
    before: str  # decoded text just before the divergence
    token: str  # the first differing token, decoded ("" when there is none)
    after: str  # decoded text just after it
    previous_token: str  # what the cached sequence had at that index ("" when it ended)


def explain_divergence(
    prompt: Sequence[int],
    cached: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    context_tokens: int = 12,
) -> Divergence:
    """Describe the first token where ``prompt`` differs from ``cached``."""
    index = common_prefix_len(prompt, cached)
    before = decode(prompt[max(0, index - context_tokens) : index])
    token = decode(prompt[index : index + 1]) if index < len(prompt) else ""
    after = decode(prompt[index + 1 : index + 1 + context_tokens])
    previous = decode(cached[index : index + 1]) if index < len(cached) else ""
    return Divergence(index, before, token, after, previous)
