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

import unicodedata
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


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


class CacheModel(Protocol):
    """An engine's cache, as the harness predicts it: what a new prompt will find there.

    ``PrefixCacheModel`` below is vLLM's automatic prefix caching (whole blocks, chained); the
    breakpoint engine of lesson 3 has its own (all or nothing up to the marker). The measuring
    loop (``harness.measure``) works with either.
    """

    def predict(self, prompt: Sequence[int]) -> Prediction: ...

    def record(self, prompt: Sequence[int], output: Sequence[int] = ()) -> None: ...

    def sequence(self, index: int) -> Sequence[int]: ...

    def __len__(self) -> int: ...


class PrefixCacheModel:
    """What an engine with automatic prefix caching holds since its last reset.

    It remembers every token sequence whose KV the engine computed (the prompt, plus the
    generated tokens but the last: the last sampled token's KV is never computed) and
    predicts, for a new prompt, how much of it the engine can reuse. It assumes nothing was
    evicted; the engine's own count shows when that assumption fails.

    The lookup is vLLM's own: a dict keyed by (parent block, this block's tokens), so a block
    is found only through the chain of every block before it, and a prompt costs time in
    proportion to its own length, not to everything seen before. The one step vLLM does not
    need, the exact first divergent token, compares the prompt's next (partial) block with the
    few continuations recorded after the last matching block.
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.reset()

    def reset(self) -> None:
        self._seen: list[array[int]] = []
        # node 0 is the empty prefix; node n > 0 is one full block reached through its parent
        self._children: dict[tuple[int, tuple[int, ...]], int] = {}
        self._latest: list[int] = [-1]  # node -> most recent sequence through it
        # node -> what followed it (a full block, or a shorter tail where a sequence ended)
        # -> the most recent sequence that continued that way
        self._continuations: list[dict[tuple[int, ...], int]] = [{}]

    def __len__(self) -> int:
        return len(self._seen)

    def sequence(self, index: int) -> array[int]:
        """The ``index``-th recorded sequence (in the order recorded; -1 is the latest)."""
        return self._seen[index]

    def blocks(self) -> int:
        """Distinct full blocks recorded: the KV an engine that evicts nothing holds for them."""
        return len(self._children)

    def predict(self, prompt: Sequence[int]) -> Prediction:
        """How much of ``prompt`` the cache serves; ``source`` is the recorded sequence sharing
        the longest prefix with it (the most recent one on a tie: the one an agent extends)."""
        b, node, blocks = self.block_size, 0, 0
        full = len(prompt) // b
        while blocks < full:
            child = self._children.get((node, tuple(prompt[blocks * b : (blocks + 1) * b])))
            if child is None:
                break
            node, blocks = child, blocks + 1
        chunk = tuple(prompt[blocks * b : (blocks + 1) * b])
        extra, source = 0, self._latest[node]
        for continuation, seq in self._continuations[node].items():
            n = common_prefix_len(chunk, continuation)
            if n > extra or (n == extra and n > 0 and seq > source):
                extra, source = n, seq
        common = blocks * b + extra
        cached = cached_tokens_for(len(prompt), common, b)
        return Prediction(len(prompt), common, cached, source if source >= 0 else None)

    def record(self, prompt: Sequence[int], output: Sequence[int] = ()) -> None:
        """Remember a finished request: its prompt and all generated tokens but the last."""
        computed = array("q", prompt)
        computed.extend(output[:-1])
        seq = len(self._seen)
        self._seen.append(computed)
        b, node = self.block_size, 0
        self._latest[0] = seq
        for start in range(0, len(computed) - len(computed) % b, b):
            block = tuple(computed[start : start + b])
            self._continuations[node][block] = seq
            child = self._children.get((node, block))
            if child is None:
                child = len(self._latest)
                self._children[(node, block)] = child
                self._latest.append(seq)
                self._continuations.append({})
            node = child
            self._latest[node] = seq
        self._continuations[node][tuple(computed[len(computed) - len(computed) % b :])] = seq


@dataclass(frozen=True)
class Divergence:
    """Where a prompt leaves the cached prefix, as text a person can read."""

    index: int  # token index of the first token not shared (== prompt length: none)
    before: str  # decoded text just before the divergence
    token: str  # the first differing token, decoded ("" when there is none)
    after: str  # decoded text just after it
    previous_token: str  # what the cached sequence had at that index ("" when it ended)


REPLACEMENT_CHARACTER = "\ufffd"  # what a decoder shows for the bytes of a split character
MAX_TOKENS_PER_CHARACTER = 4  # UTF-8 needs at most 4 bytes; byte-level BPE at most one token each


def whole_characters(
    ids: Sequence[int], start: int, end: int, decode: Callable[[Sequence[int]], str], left: bool, right: bool
) -> tuple[int, int]:
    """Widen ``ids[start:end]`` (on the sides allowed) until its text has no split character at
    its ends: a byte-level tokenizer can cut one character over several tokens, and a window cut
    there decodes to replacement characters on both sides. A combining mark (a decomposed
    accent) right after the window belongs to the character the window ends with."""
    for _ in range(MAX_TOKENS_PER_CHARACTER - 1):
        text = decode(ids[start:end])
        if left and start > 0 and (text.startswith(REPLACEMENT_CHARACTER) or _combining(text[:1])):
            start -= 1
        elif right and end < len(ids) and (
            text.endswith(REPLACEMENT_CHARACTER)
            or _combining(decode(ids[end : end + MAX_TOKENS_PER_CHARACTER])[:1])
        ):
            end += 1
        else:
            break
    return start, end


def _combining(char: str) -> bool:
    return bool(char) and unicodedata.combining(char) > 0


def explain_divergence(
    prompt: Sequence[int],
    cached: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    context_tokens: int = 12,
) -> Divergence:
    """Describe the first token where ``prompt`` differs from ``cached``, in whole characters:
    when that token holds only part of a character, ``token`` grows to the whole character (and
    ``before`` ends where it starts)."""
    index = common_prefix_len(prompt, cached)
    start, end = whole_characters(prompt, index, index + 1, decode, left=True, right=True)
    first, _ = whole_characters(prompt, max(0, start - context_tokens), start, decode, left=True, right=False)
    _, last = whole_characters(prompt, end, end + context_tokens, decode, left=False, right=True)
    token = decode(prompt[start:end]) if index < len(prompt) else ""
    previous = ""
    if index < len(cached):
        _, cached_end = whole_characters(cached, start, index + 1, decode, left=False, right=True)
        previous = decode(cached[start:cached_end])
    return Divergence(index, decode(prompt[first:start]), token, decode(prompt[end:last]), previous)
