"""Each provider's cache rule, as a function from (prompt, cache state) to what the request reads and writes.

Every rule returns an ``Outcome`` without touching the state; ``Outcome.commit()`` then applies
the request's writes and refreshes. That split lets the simulation ask "what would this request
have read had it been append-only?" against the very state the real request met.

Two kinds of state:

``DigestStore``
    Entries keyed by a digest of the exact token prefix they end at. For the breakpoint
    families (Anthropic, OpenAI GPT-5.6+): an entry exists only where a request wrote one, and a
    lookup only checks the boundaries the rules name.
``SequenceStore``
    The prompts seen before, as a tree of token chunks. For the automatic prefix families (OpenAI
    before GPT-5.6, Gemini implicit caching): a hit is the longest common prefix with any live
    one, rounded to the rule's step.

``UnitStore``
    Whole prefixes the provider persisted as units (DeepSeek's disk cache): a request is served
    only the longest unit it matches in full, never a partial one.

Lifetimes: an entry expires ``ttl`` seconds after it was last written or read (a hit refreshes
it, as every provider here documents); without timestamps nothing expires.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from harness.prefix import BlockChain, shared_tokens
from harness.providers.table import ModelEntry
from harness.providers.tokens import Prompt

DEVELOPER_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Outcome:
    cached: int
    writes: Mapping[str, int]  # write TTL label -> tokens written at it
    notes: tuple[str, ...]
    commit: Callable[[], None] = field(compare=False)

    @property
    def written(self) -> int:
        return sum(self.writes.values())


def _nothing() -> None:
    return None


def duration(seconds: float) -> str:
    """'45 s', '6 min', '6.5 min', '2 h': for notes a person reads."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}".rstrip("0").rstrip(".") + " min"
    return f"{seconds / 3600:.1f}".rstrip("0").rstrip(".") + " h"


def _expired_note(now: float, last_used: float, ttl: float) -> str:
    return f"expired: {duration(now - last_used)} since last use (TTL {duration(ttl)})"


# --------------------------------------------------------------------------- state


@dataclass
class _Entry:
    ttl: float | None
    last_used: float | None

    def live(self, now: float | None) -> bool:
        if now is None or self.ttl is None or self.last_used is None:
            return True
        return now - self.last_used <= self.ttl


class DigestStore:
    """Cache entries keyed by a digest of the prefix they end at."""

    def __init__(self) -> None:
        self._entries: dict[bytes, _Entry] = {}

    def get(self, key: bytes) -> _Entry | None:
        return self._entries.get(key)

    def write(self, key: bytes, now: float | None, ttl: float | None) -> None:
        old = self._entries.get(key)
        if old is not None and old.live(now) and old.ttl is not None and ttl is not None:
            ttl = max(ttl, old.ttl)  # a shorter write does not cut a longer entry short
        self._entries[key] = _Entry(ttl, now)

    def touch(self, key: bytes, now: float | None) -> None:
        entry = self._entries.get(key)
        if entry is not None and now is not None:
            entry.last_used = now


def prefix_digests(tokens: Sequence[int], positions: Iterable[int]) -> dict[int, bytes]:
    """Digest of ``tokens[:p]`` for each ``p``, in one pass (the hash of a prefix chains like vLLM's)."""
    wanted = sorted({p for p in positions if 0 < p <= len(tokens)})
    hasher = hashlib.blake2b(digest_size=16)
    digests: dict[int, bytes] = {}
    done = 0
    for position in wanted:
        hasher.update(array("q", tokens[done:position]).tobytes())
        done = position
        digests[position] = hasher.copy().digest()
    return digests


class _Chunk:
    """One chunk of tokens every prompt through it shares, and when the last of them expires."""

    __slots__ = ("block", "entry", "nexts")

    def __init__(self, block: bytes, entry: _Entry) -> None:
        self.block = block
        self.entry = entry  # of the prompt through this chunk that stays live the longest
        self.nexts: dict[bytes, _Entry] = {}  # what followed (a chunk, or a prompt's shorter end)


def _expires(entry: _Entry) -> float:
    if entry.ttl is None or entry.last_used is None:
        return float("inf")
    return entry.last_used + entry.ttl


def _later(old: _Entry | None, new: _Entry) -> _Entry:
    return new if old is None or _expires(new) >= _expires(old) else old


class SequenceStore:
    """Every prompt computed before, with when it was last used, as a tree of token chunks.

    A prompt is cut into chunks of ``CHUNK`` tokens found by a hash chained over every chunk
    before (``harness.prefix.BlockChain``, as vLLM finds its blocks); each chunk remembers the
    entry that stays live the longest of the prompts through it, so the live prefix of a new
    prompt ends where the walk meets the first expired chunk (a chunk's prompts include every
    prompt through the chunks after it). The exact last tokens come from comparing what followed
    the last chunk. Memory: one chunk per distinct run of tokens, however many prompts repeat it.
    """

    CHUNK = 64

    def __init__(self) -> None:
        self._chunks: dict[int, _Chunk] = {}
        self._root: dict[bytes, _Entry] = {}  # what the prompts started with (shorter than a chunk)

    def _path(self, chain: BlockChain) -> list[_Chunk]:
        path: list[_Chunk] = []
        for index, key in enumerate(chain.keys):
            chunk = self._chunks.get(key)
            if chunk is None or chunk.block != chain.block(index):
                break
            path.append(chunk)
        return path

    @staticmethod
    def _extra(
        nexts: dict[bytes, _Entry], rest: bytes, now: float | None, live: bool
    ) -> tuple[int, _Entry | None]:
        best, found = 0, None
        for continuation, entry in nexts.items():
            if live and not entry.live(now):
                continue
            shared = shared_tokens(rest, continuation)
            if shared > best:
                best, found = shared, entry
        return best, found

    def best(
        self, tokens: Sequence[int], now: float | None
    ) -> tuple[int, None, int, _Entry | None]:
        """(longest live shared prefix, None, longest expired one beyond it, its entry)."""
        chain = BlockChain(tokens, self.CHUNK)
        path = self._path(chain)
        alive = 0
        while alive < len(path) and path[alive].entry.live(now):
            alive += 1
        nexts = path[alive - 1].nexts if alive else self._root
        extra, _ = self._extra(nexts, chain.block(alive), now, live=True)
        live = alive * self.CHUNK + extra
        deepest = path[-1].nexts if path else self._root
        extra, entry = self._extra(deepest, chain.block(len(path)), now, live=False)
        dead = len(path) * self.CHUNK + extra
        if extra == 0 and path:
            entry = path[-1].entry
        if dead <= live:
            return live, None, 0, None
        return live, None, dead, entry

    def add(self, tokens: Sequence[int], now: float | None, ttl: float | None) -> None:
        chain = BlockChain(tokens, self.CHUNK)
        entry = _Entry(ttl, now)
        nexts = self._root
        for index, key in enumerate(chain.keys):
            block = chain.block(index)
            nexts[block] = _later(nexts.get(block), entry)
            chunk = self._chunks.get(key)
            if chunk is None or chunk.block != block:
                chunk = self._chunks[key] = _Chunk(block, entry)
            chunk.entry = _later(chunk.entry, entry)
            nexts = chunk.nexts
        tail = chain.block(len(chain.keys))
        nexts[tail] = _later(nexts.get(tail), entry)


class UnitStore(DigestStore):
    """Persisted prefix units, the lengths they come in, and the prompts seen (for common prefixes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: set[int] = set()
        self.answered: set[bytes] = set()  # prompt-end units the model answered: their output is a unit too
        self.prompts = SequenceStore()

    def persist(self, key: bytes, length: int, now: float | None, ttl: float | None) -> None:
        self.write(key, now, ttl)
        self.lengths.add(length)


# --------------------------------------------------------------------------- Anthropic


def anthropic(
    entry: ModelEntry, prompt: Prompt, top_level: str | None, store: DigestStore, now: float | None
) -> Outcome:
    """Explicit ``cache_control`` breakpoints (and the automatic one), 20-block lookback, minimum, TTLs.

    The same rule serves the providers that copied it with their own numbers: Bedrock's
    ``cachePoint`` (Claude: 20-block lookback; Nova: no lookback, no checkpoint on a tool, 5
    minutes only) and Alibaba's explicit cache (5 minutes only; of more than 4 markers the last 4
    count, where Anthropic refuses the request).
    """
    rules = entry.rules
    blocks = prompt.blocks
    notes: list[str] = []
    markers: list[tuple[int, str]] = []
    for index, block in enumerate(blocks):
        if block.cache_control is None:
            continue
        if block.empty:
            notes.append(f"block {index + 1} is empty: an empty text block cannot be cached")
            continue
        if block.kind == "tool" and not rules.tool_breakpoints:
            notes.append(f"a breakpoint on tool definition {index + 1}: not accepted there, ignored")
            continue
        markers.append((index, block.cache_control))
    filled = [index for index, block in enumerate(blocks) if not block.empty]
    if top_level is not None and filled:
        last = filled[-1]
        on_last = blocks[last].cache_control
        if on_last == top_level:
            pass  # the documented no-op: the last block already carries the same breakpoint
        elif on_last is not None:
            notes.append(
                f"top-level cache_control ({top_level}) differs from the last block's ({on_last}): "
                "the API returns a 400 error"
            )
        elif len(markers) >= rules.max_breakpoints:
            notes.append(
                f"{len(markers)} block breakpoints leave no slot for the top-level cache_control: "
                "the API returns a 400 error"
            )
        else:
            markers.append((last, top_level))
    if len(markers) > rules.max_breakpoints and rules.excess_breakpoints == "keep_last":
        notes.append(f"{len(markers)} breakpoints: only the last {rules.max_breakpoints} take effect")
        markers = markers[-rules.max_breakpoints :]
    elif len(markers) > rules.max_breakpoints:
        notes.append(
            f"{len(markers)} breakpoints: the API refuses more than {rules.max_breakpoints} "
            f"(simulated with the first {rules.max_breakpoints})"
        )
        markers = markers[: rules.max_breakpoints]
    if any(ttl not in rules.ttl_by_label for _, ttl in markers):
        notes.append("a 1h breakpoint where only 5-minute caching is offered: written for 5 minutes")
        markers = [(index, ttl if ttl in rules.ttl_by_label else "5m") for index, ttl in markers]
    ttls = [ttl for _, ttl in markers]
    if "5m" in ttls and "1h" in ttls[ttls.index("5m") :]:
        notes.append("a 1h breakpoint after a 5m one: the API wants longer TTLs first")
    if not markers:
        notes.append("no cache_control breakpoint: nothing read from or written to the cache")
        return Outcome(0, {}, tuple(notes), _nothing)

    window = rules.lookback_blocks
    positions = {blocks[j].end for i, _ in markers for j in range(max(0, i - window + 1), i + 1)}
    digests = prefix_digests(prompt.tokens, positions)
    best, best_key = 0, None
    expired: tuple[int, _Entry] | None = None
    for index, _ in markers:
        # Walk back from the breakpoint, at most `window` positions (the breakpoint is the first).
        for j in range(index, max(-1, index - window), -1):
            position = blocks[j].end
            found = store.get(digests[position]) if position in digests else None
            if found is None:
                continue
            if found.live(now):
                if position > best:
                    best, best_key = position, digests[position]
                break
            if expired is None or position > expired[0]:
                expired = (position, found)
    if expired is not None and expired[0] > best and now is not None:
        dead = expired[1]
        assert dead.last_used is not None and dead.ttl is not None  # only entries with both expire
        notes.append(_expired_note(now, dead.last_used, dead.ttl))

    minimum = entry.min_tokens
    candidates = [(blocks[i].end, ttl) for i, ttl in markers if blocks[i].end > best]
    short = [position for position, _ in candidates if position < minimum]
    if short and len(short) == len(candidates) and best == 0:
        notes.append(f"below the {minimum:,}-token minimum: nothing cached")
    elif short:
        notes.append(f"breakpoint at {short[0]:,} tokens is below the {minimum:,}-token minimum: not cached")
    to_write = [(position, ttl) for position, ttl in candidates if position >= minimum]
    last_write = max((position for position, _ in to_write), default=best)
    last_hour = max((position for position, ttl in to_write if ttl == "1h"), default=best)
    # Anthropic's mixed-TTL billing: A = the hit, B = the last 1h breakpoint after it, C = the last
    # breakpoint; B - A is billed as 1h writes, C - B as 5m writes.
    writes = {"1h": last_hour - best, "5m": last_write - last_hour}
    writes = {ttl: tokens for ttl, tokens in writes.items() if tokens > 0}

    def commit() -> None:
        if best_key is not None:
            store.touch(best_key, now)
        for position, ttl in to_write:
            store.write(digests[position], now, rules.ttl_by_label[ttl])

    return Outcome(best, writes, tuple(notes), commit)


# --------------------------------------------------------------------------- OpenAI GPT-5.6+


def _eligible_message_ends(prompt: Prompt) -> tuple[list[int], int | None]:
    """Message ends OpenAI's implicit mode may break at, and the end of the initial developer block."""
    messages = [
        (block.role, block.end) for block in prompt.blocks if block.closes_message and block.kind != "tool"
    ]
    initial = 0
    while initial < len(messages) and messages[initial][0] in DEVELOPER_ROLES:
        initial += 1
    eligible: list[int] = []
    for k, (role, end) in enumerate(messages):
        if role == "user":
            eligible.append(end)
        elif role == "tool" and (k + 1 == len(messages) or messages[k + 1][0] != "tool"):
            eligible.append(end)  # the last tool response of a consecutive group
        elif role in DEVELOPER_ROLES and k == initial - 1:
            eligible.append(end)  # the last developer message of the initial group
    return eligible, (messages[initial - 1][1] if initial else None)


def openai_breakpoints(
    entry: ModelEntry, prompt: Prompt, mode: str | None, store: DigestStore, now: float | None
) -> Outcome:
    """GPT-5.6 and later: an implicit breakpoint at the latest eligible message, explicit ones, 30 minutes."""
    rules = entry.rules
    implicit = (mode or "implicit") == "implicit"
    notes: list[str] = []
    explicit = [block.end for block in prompt.blocks if block.cache_control is not None and not block.empty]
    lookups = set(explicit[: rules.explicit_first] + explicit[-rules.explicit_latest :])
    writes_at: list[int] = []
    if implicit:
        eligible, developer_end = _eligible_message_ends(prompt)
        if eligible:
            lookups.add(eligible[-1])
            lookups.update(eligible[:-1][-rules.earlier_message_endings :])
            writes_at.append(eligible[-1])
        else:
            notes.append("no user, tool or initial developer message: no implicit breakpoint")
        if developer_end is not None:
            lookups.add(developer_end)
        slots = rules.max_writes - len(writes_at)
        writes_at += explicit[-slots:] if slots > 0 else []
    else:
        writes_at = explicit[-rules.max_writes :] if rules.max_writes else []
        if not explicit:
            notes.append("explicit mode without a prompt_cache_breakpoint: nothing cached")

    digests = prefix_digests(prompt.tokens, lookups | set(writes_at))
    best, best_key = 0, None
    expired: _Entry | None = None
    for position in sorted(lookups, reverse=True):
        found = store.get(digests[position]) if position in digests else None
        if found is None:
            continue
        if found.live(now):
            best, best_key = position, digests[position]
            break
        if expired is None:
            expired = found
    if expired is not None and best_key is None and now is not None:
        assert expired.last_used is not None and expired.ttl is not None
        notes.append(_expired_note(now, expired.last_used, expired.ttl))

    minimum = entry.min_tokens
    candidates = sorted({position for position in writes_at if position > best})
    if candidates and best == 0 and all(position < minimum for position in candidates):
        notes.append(f"below the {minimum:,}-token minimum: nothing cached")
    to_write = [position for position in candidates if position >= minimum]
    written = (max(to_write) - best) if to_write else 0

    def commit() -> None:
        if best_key is not None:
            store.touch(best_key, now)
        for position in to_write:
            store.write(digests[position], now, rules.ttl_seconds)

    return Outcome(best, {"30m": written} if written else {}, tuple(notes), commit)


# --------------------------------------------------------------------------- automatic prefixes


def automatic_prefix(entry: ModelEntry, prompt: Prompt, store: SequenceStore, now: float | None) -> Outcome:
    """The automatic prefix families: the longest prefix shared with a live earlier prompt, from a minimum.

    Rounded down to the rule's step (OpenAI before GPT-5.6: 128; Mistral: 64-token blocks), or to
    the last whole message inside it (xAI: "messages at the beginning that match exactly"). Writes
    are free, except where the provider bills them (Kimi: the uncached rest of a prompt from the
    minimum on is written at ``write_ttl``).
    """
    rules = entry.rules
    minimum = entry.min_tokens
    message_ends = [block.end for block in prompt.blocks if block.closes_message]

    def usable(shared: int) -> int:
        """Shared tokens the rule can serve: whole steps, whole messages, from the minimum."""
        if rules.boundary == "message":
            shared = max((end for end in message_ends if end <= shared), default=0)
        shared = rules.interval * (shared // rules.interval)
        return shared if shared >= minimum else 0

    live, _, dead, dead_entry = store.best(prompt.tokens, now)
    cached = usable(live)
    notes: list[str] = []
    if prompt.length < minimum:
        notes.append(f"below the {minimum:,}-token minimum: nothing cached")
    elif dead_entry is not None and usable(dead) > cached:
        last_used, ttl = dead_entry.last_used, dead_entry.ttl
        if now is not None and last_used is not None and ttl is not None:
            notes.append(_expired_note(now, last_used, ttl))
    writes: dict[str, int] = {}
    if rules.write_ttl is not None and prompt.length >= minimum and prompt.length > cached:
        writes[rules.write_ttl] = prompt.length - cached

    def commit() -> None:
        # Reuse refreshes what was reused: this prompt starts with exactly that prefix and is stored
        # as used now, while the older prompt's unshared tail keeps its own age.
        store.add(prompt.tokens, now, rules.ttl_seconds)

    return Outcome(cached, writes, tuple(notes), commit)


# --------------------------------------------------------------------------- DeepSeek units


def _answer_ends(prompt: Prompt) -> dict[int, int]:
    """Start of each assistant message -> its end: where a re-sent reply would end an output unit."""
    ends: dict[int, int] = {}
    start = 0
    for index, block in enumerate(prompt.blocks):
        if block.role == "assistant" and (index == 0 or prompt.blocks[index - 1].closes_message):
            start = prompt.blocks[index - 1].end if index else 0
        if block.role == "assistant" and block.closes_message:
            ends[start] = block.end
    return ends


def prefix_units(
    entry: ModelEntry, prompt: Prompt, output_tokens: int, store: UnitStore, now: float | None
) -> Outcome:
    """DeepSeek's disk cache: a request reads the longest persisted unit it matches in full.

    Units are persisted at the end of each request's input and of its output (an earlier reply
    re-sent as the assistant message right after that input, unchanged, ends there), at a prefix
    two requests were seen to share (so the *third* request reads it), and every ``interval``
    tokens of a long prompt when the rule set gives the interval (DeepSeek does not). Writes are
    free; reads are the model's cache-hit price.
    """
    rules = entry.rules
    if not prompt.length:
        return Outcome(0, {}, (), _nothing)
    answers = _answer_ends(prompt)
    positions = {n for n in store.lengths if n <= prompt.length} | set(answers) | {prompt.length}
    digests = prefix_digests(prompt.tokens, positions)
    output_keys = prefix_digests(prompt.tokens, answers.values())
    units: dict[int, tuple[bytes, _Entry]] = {}  # length -> (key, entry) of every unit this prompt matches
    for length in store.lengths & digests.keys():
        found = store.get(digests[length])
        if found is not None:
            units[length] = (digests[length], found)
    for start, end in answers.items():
        key = digests.get(start)  # a reply at the very start answers no input: no key, no unit
        answered = store.get(key) if key is not None and key in store.answered else None
        if answered is not None and end not in units:
            # The reply re-sent unchanged ends the output unit persisted with the input it answered.
            units[end] = (output_keys[end], store.get(output_keys[end]) or answered)
    best, best_key, expired = 0, None, None
    for length in sorted(units, reverse=True):
        key, found = units[length]
        if found.live(now):
            best, best_key = length, key
            break
        expired = expired or found
    if best < entry.min_tokens:
        best, best_key = 0, None
    notes: list[str] = []
    if expired is not None and now is not None:
        assert expired.last_used is not None and expired.ttl is not None
        notes.append(_expired_note(now, expired.last_used, expired.ttl))
    shared, _, _, _ = store.prompts.best(prompt.tokens, now)
    if shared > best:
        notes.append(
            f"shares {shared:,} tokens with an earlier prompt, but no persisted unit ends there: "
            "persisted now as a common prefix, so a later request can read it"
        )
    fixed = range(rules.interval, prompt.length + 1, rules.interval) if rules.interval else range(0)

    def commit() -> None:
        ttl = rules.ttl_seconds
        if best_key is not None:
            if store.get(best_key) is None:
                store.persist(best_key, best, now, ttl)  # an output unit, now known by its own key
            store.touch(best_key, now)
        persisted = {prompt.length: digests[prompt.length]}
        if shared > best:
            persisted[shared] = prefix_digests(prompt.tokens, [shared])[shared]
        persisted.update(prefix_digests(prompt.tokens, fixed))
        for length, key in persisted.items():
            store.persist(key, length, now, ttl)
        if output_tokens > 0:
            store.answered.add(digests[prompt.length])
        store.prompts.add(prompt.tokens, now, ttl)

    return Outcome(best, {}, tuple(notes), commit)


def no_caching(entry: ModelEntry) -> Outcome:
    return Outcome(0, {}, (f"{entry.key} has no prompt caching",), _nothing)
