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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


def common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Number of leading items ``a`` and ``b`` share (token IDs, or the characters of two strings).

    Slices are compared at C speed, coarse to fine: a prompt of tens of thousands of tokens costs
    a few dozen slice comparisons, not a Python step per token."""
    n = min(len(a), len(b))
    if type(a) is not type(b):  # an array and a list never compare equal slice by slice
        a, b = list(a[:n]), list(b[:n])
    start = 0
    for step in (4096, 64, 1):
        while start + step <= n and a[start : start + step] == b[start : start + step]:
            start += step
    return start


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


TOKEN_TYPE = "i"  # token IDs as 4-byte signed integers: blocks are compared and hashed as bytes
TOKEN_BYTES = array(TOKEN_TYPE).itemsize


def token_bytes(tokens: Sequence[int]) -> bytes:
    if isinstance(tokens, array) and tokens.typecode == TOKEN_TYPE:
        return tokens.tobytes()
    return array(TOKEN_TYPE, tokens).tobytes()


class BlockChain:
    """A token sequence cut into blocks the way vLLM hashes it: the tokens as bytes and, per full
    block, its bytes and a key chained to every block before it. Built once per request and
    shared by every cache that looks it up; built from an earlier chain, it hashes only the blocks
    after the prefix the two share (an agent's request repeats its previous one and adds a little)."""

    __slots__ = ("block_size", "blocks", "data", "keys", "length")

    def __init__(self, tokens: Sequence[int], block_size: int, previous: BlockChain | None = None) -> None:
        self.block_size = block_size
        self.data = token_bytes(tokens)
        self.length = len(self.data) // TOKEN_BYTES
        size = block_size * TOKEN_BYTES
        full = self.length // block_size
        keys: list[int] = []
        blocks: list[bytes] = []
        if previous is not None and previous.block_size == block_size and previous.keys:
            same = min(len(previous.keys), full)
            if not self.data.startswith(memoryview(previous.data)[: same * size]):
                same = shared_tokens(self.data, previous.data) // block_size
            keys, blocks = previous.keys[:same], previous.blocks[:same]
        parent = keys[-1] if keys else ROOT
        data = self.data
        for index in range(len(keys), full):
            block = data[index * size : (index + 1) * size]
            parent = hash((parent, block))
            keys.append(parent)
            blocks.append(block)
        self.keys = keys
        self.blocks = blocks

    def __len__(self) -> int:
        return self.length

    def block(self, index: int) -> bytes:
        """Full block ``index``, or the partial block after the last full one."""
        if index < len(self.blocks):
            return self.blocks[index]
        size = self.block_size * TOKEN_BYTES
        return self.data[index * size : (index + 1) * size]


def shared_tokens(a: bytes, b: bytes, a_at: int = 0, b_at: int = 0) -> int:
    """Tokens ``a[a_at:]`` and ``b[b_at:]`` (byte offsets) share at their start: a binary search
    over C comparisons that copy nothing (``startswith`` of a memoryview)."""
    view = memoryview(b)
    lo, hi = 0, min(len(a) - a_at, len(b) - b_at) // TOKEN_BYTES
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(view[b_at : b_at + mid * TOKEN_BYTES], a_at):
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Node:
    """One cached block: its tokens (as bytes), the block before it, what followed it."""

    __slots__ = ("block", "latest", "nexts", "parent")

    def __init__(self, parent: int, block: bytes, latest: int) -> None:
        self.parent = parent  # the node id of the block before it (ROOT for the first)
        self.block = block
        self.latest = latest  # the most recent sequence through this block
        # what followed it: a full block (a child's tokens) or a shorter tail where a sequence
        # ended -> the most recent sequence that continued that way. Most blocks of agent
        # traffic have one continuation: a (block, sequence) pair then, a dict only for more.
        self.nexts: tuple[bytes, int] | dict[bytes, int] | None = None

    def follow(self, block: bytes, seq: int) -> None:
        nexts = self.nexts
        if nexts is None or (type(nexts) is tuple and nexts[0] == block):
            self.nexts = (block, seq)
        elif type(nexts) is tuple:
            self.nexts = {nexts[0]: nexts[1], block: seq}
        else:
            nexts[block] = seq  # type: ignore[index]

    def continuations(self) -> Iterable[tuple[bytes, int]]:
        nexts = self.nexts
        if nexts is None:
            return ()
        if type(nexts) is tuple:
            return (nexts,)  # type: ignore[return-value]
        return nexts.items()  # type: ignore[union-attr]

    def forget(self, block: bytes) -> None:
        nexts = self.nexts
        if type(nexts) is tuple:
            if nexts[0] == block:
                self.nexts = None
        elif nexts is not None:
            nexts.pop(block, None)  # type: ignore[union-attr]


ROOT = 0


class PrefixCacheModel:
    """What an engine with automatic prefix caching holds since its last reset.

    It remembers every token sequence whose KV the engine computed (the prompt, plus the
    generated tokens but the last: the last sampled token's KV is never computed) and
    predicts, for a new prompt, how much of it the engine can reuse.

    The lookup is vLLM's own: a block is found by a hash of its tokens chained to the block
    before it, so it is found only through the chain of every block before it, and a prompt
    costs time in proportion to its own length, not to everything seen before. The one step
    vLLM does not need, the exact first divergent token, compares the prompt's next (partial)
    block with the few continuations recorded after the last matching block.

    Memory: one entry per distinct block (its tokens as bytes), however many requests shared
    it. ``capacity_blocks`` bounds it the way an engine's KV cache is bounded: past it, the
    least recently used blocks are evicted, the deeper blocks of a request before the ones it
    starts with (vLLM frees a finished request's blocks tail first); a block whose parent was
    evicted is not found until the parent is computed again. ``keep_sequences`` keeps every
    recorded sequence for ``sequence()``, each stored as the part it does not share with an
    earlier one (an agent's session costs its new tokens, not its prompts' sum).
    """

    def __init__(
        self, block_size: int, capacity_blocks: int | None = None, keep_sequences: bool = True
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if capacity_blocks is not None and capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.keep_sequences = keep_sequences
        self.reset()

    def reset(self) -> None:
        self._nodes: dict[int, _Node] = {ROOT: _Node(ROOT, b"", -1)}
        self._recorded = 0
        self.evicted_blocks = 0
        self.peak_blocks = 0
        self._lru: OrderedDict[int, None] = OrderedDict()  # only with a capacity
        # per sequence: (sequence it shares a prefix with, tokens shared, its own tail)
        self._parts: list[tuple[int, int, array[int]]] = []

    def __len__(self) -> int:
        return self._recorded

    @property
    def blocks(self) -> int:
        """Full blocks held now."""
        return len(self._nodes) - 1

    def chain(self, tokens: Sequence[int] | BlockChain) -> BlockChain:
        if isinstance(tokens, BlockChain) and tokens.block_size == self.block_size:
            return tokens
        return BlockChain(tokens, self.block_size)

    def _walk(self, chain: BlockChain, full: int) -> tuple[_Node, int]:
        """The deepest cached node along ``chain``'s first ``full`` blocks, and its depth."""
        node, blocks = self._nodes[ROOT], 0
        nodes, keys, data = self._nodes, chain.keys, chain.blocks
        while blocks < full:
            child = nodes.get(keys[blocks])
            if child is None or child.block != data[blocks]:  # (a hash collision: never seen)
                break
            node, blocks = child, blocks + 1
        return node, blocks

    def predict(self, prompt: Sequence[int] | BlockChain) -> Prediction:
        """How much of ``prompt`` the cache serves; ``source`` is the recorded sequence sharing
        the longest prefix with it (the most recent one on a tie: the one an agent extends)."""
        chain = self.chain(prompt)
        b = self.block_size
        node, blocks = self._walk(chain, len(chain.keys))
        chunk = chain.block(blocks)
        extra, source = 0, node.latest
        for continuation, seq in node.continuations():
            n = shared_tokens(chunk, continuation)
            if n > extra or (n == extra and n > 0 and seq > source):
                extra, source = n, seq
        common = blocks * b + extra
        cached = cached_tokens_for(chain.length, common, b)
        return Prediction(chain.length, common, cached, source if source >= 0 else None)

    def record(self, prompt: Sequence[int] | BlockChain, output: Sequence[int] = ()) -> None:
        """Remember a finished request: its prompt and all generated tokens but the last."""
        chain = self.chain(prompt)
        if len(output) > 1:
            computed = array(TOKEN_TYPE, chain.data)
            computed.extend(output[:-1])
            chain = BlockChain(computed, self.block_size, previous=chain)
        seq = self._recorded
        self._recorded += 1
        b, full = self.block_size, len(chain.keys)
        if self.keep_sequences:
            shared_node, shared_blocks = self._walk(chain, full)
            parent = shared_node.latest if shared_blocks else -1
            shared = shared_blocks * b if parent >= 0 else 0
            tail = array(TOKEN_TYPE)
            tail.frombytes(chain.data[shared * TOKEN_BYTES :])
            self._parts.append((parent, shared, tail))
        nodes = self._nodes
        parent_key, node = ROOT, nodes[ROOT]
        node.latest = seq
        for key, block in zip(chain.keys, chain.blocks, strict=True):
            node.follow(block, seq)
            child = nodes.get(key)
            if child is None or child.block != block:
                child = nodes[key] = _Node(parent_key, block, seq)
            child.latest = seq
            parent_key, node = key, child
        node.follow(chain.block(full), seq)
        if self.capacity_blocks is not None:
            for key in reversed(chain.keys):  # the chain's tail becomes the least recently used
                self._lru[key] = None
                self._lru.move_to_end(key)
            while self.blocks > self.capacity_blocks and self._lru:
                self._evict(self._lru.popitem(last=False)[0])
        self.peak_blocks = max(self.peak_blocks, self.blocks)

    def _evict(self, key: int) -> None:
        node = self._nodes.pop(key, None)
        if node is None:
            return
        parent = self._nodes.get(node.parent)
        if parent is not None:
            parent.forget(node.block)
        self.evicted_blocks += 1

    def sequence_length(self, index: int) -> int:
        """The length of the ``index``-th recorded sequence, without building it."""
        if not self.keep_sequences:
            raise ValueError("this cache model keeps no sequences (keep_sequences=False)")
        _, shared, tail = self._parts[index]
        return shared + len(tail)

    def sequence(self, index: int) -> array[int]:
        """The ``index``-th recorded sequence (in the order recorded; -1 is the latest)."""
        if not self.keep_sequences:
            raise ValueError("this cache model keeps no sequences (keep_sequences=False)")
        index = index + self._recorded if index < 0 else index
        if not 0 <= index < self._recorded:
            raise IndexError(index)
        # Walk up the chain of shared prefixes, keeping each sequence's own part that the one
        # below it still needs, then join them front to back: one copy of each token.
        pieces: list[array[int]] = []
        end = None
        while index >= 0:
            parent, shared, tail = self._parts[index]
            stop = len(tail) if end is None else max(0, end - shared)
            if stop > 0:
                pieces.append(tail[:stop])
            end = shared if end is None else min(end, shared)
            if end == 0:
                break
            index = parent
        out = array(TOKEN_TYPE)
        for piece in reversed(pieces):
            out.extend(piece)
        return out


RESYNC = 8  # tokens two prompts must share again for a changed span to end


def resync(new: Sequence[int], old: Sequence[int], start: int) -> tuple[int, int]:
    """(end in ``new``, end in ``old``): the first place after ``start`` where the two prompts
    agree again for good: ``RESYNC`` tokens of ``new`` found in ``old`` (after ``start`` there
    too), from where they agree to the end of ``old``. A reordered JSON object or tool list repeats
    long runs of the old text in another place; those stop agreeing before the end and do not
    count. When no place agrees to the end (a second change later on), the longest agreement wins
    (the first of equals); when there is none, the ends of both.

    The runs of ``old`` are found by a byte search over the tokens (C speed), and a match that
    merely continues the one before it is skipped: it agrees no longer than that one did.
    """
    new_bytes, old_bytes = token_bytes(new), token_bytes(old)
    width = RESYNC * TOKEN_BYTES
    best, best_run = (len(new), len(old)), 0
    for i in range(start, len(new) - RESYNC + 1):
        gram = new_bytes[i * TOKEN_BYTES : i * TOKEN_BYTES + width]
        at = old_bytes.find(gram, start * TOKEN_BYTES)
        while at >= 0:
            if at % TOKEN_BYTES:  # a match across token boundaries: not a token match
                at = old_bytes.find(gram, at + 1)
                continue
            j = at // TOKEN_BYTES
            if not (i > start and j > start and new[i - 1] == old[j - 1]):
                run = shared_tokens(new_bytes, old_bytes, i * TOKEN_BYTES, at)
                if j + run == len(old):
                    return i, j
                if run > best_run:
                    best, best_run = (i, j), run
            at = old_bytes.find(gram, at + TOKEN_BYTES)
    return best


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
    index: int | None = None,
) -> Divergence:
    """Describe the first token where ``prompt`` differs from ``cached``, in whole characters:
    when that token holds only part of a character, ``token`` grows to the whole character (and
    ``before`` ends where it starts). ``index``: that token, when the caller knows it already
    (``cached`` may then end there: what follows it is not needed)."""
    if index is None:
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
