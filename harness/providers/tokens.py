"""Counting a prompt in a provider's tokens and laying it out as the provider reads it.

OpenAI's tokenizers are public: ``bpe-openai`` embeds ``o200k_base`` (GPT-4o and newer) and
``cl100k_base`` (GPT-4, GPT-3.5), so the text of every piece is counted exactly. What OpenAI adds
around chat messages is not public; the cookbook's count ("How to count tokens with tiktoken")
is used: 3 tokens per message plus the role's tokens, and 3 more priming the reply
(``<|start|>assistant<|message|>``). Tool definitions are counted as their JSON text. So OpenAI
totals can be off by a few tokens per message or tool; where the prompt first differs is exact.

Anthropic and Google publish no offline tokenizer: their prompts are counted in ``o200k_base``
as an approximation (``approximate=True`` on every result).

A laid-out prompt is the token sequence plus, for every piece, the token offset where it ends:
breakpoints sit at piece ends, the 20-block lookback counts pieces, OpenAI's implicit breakpoint
sits at the end of a message.
"""

from __future__ import annotations

import functools
import warnings
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError
from harness.providers.requests import Segment
from harness.providers.table import ModelEntry, PriceTable

BPE_OPENAI_HINT = "pip install bpe-openai==0.1.4 (it is in requirements.txt)"

# Stand-ins for OpenAI's chat special tokens. Negative ids never collide with a real token, and
# the same role always gets the same ids, so framing compares equal across requests exactly when
# the real special tokens would.
MESSAGE_START = -1
MESSAGE_CONTENT = -2
MESSAGE_END = -3


@functools.lru_cache(maxsize=8)
def _encoding(name: str) -> Any:
    with warnings.catch_warnings():
        # bpe-openai 0.1.4 loads its rank tables (on import and on first use) through a deprecated
        # importlib.resources call; the warning is theirs, not something a user can act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import bpe_openai  # embeds o200k_base and cl100k_base: no download, works offline
        except ImportError:
            raise UserError(f"counting tokens needs the bpe-openai package: {BPE_OPENAI_HINT}") from None
        try:
            encoding = bpe_openai.get_encoding(name)
            encoding.encode_ordinary("warm up")
            return encoding
        except Exception:
            known = "bpe-openai has o200k_base and cl100k_base"
            raise UserError(f"unknown tokenizer encoding '{name}' ({known})") from None


@functools.lru_cache(maxsize=65536)
def encode(encoding: str, text: str) -> tuple[int, ...]:
    """Token ids of ``text``; special-token strings in it are plain text, as in an API request's content."""
    return tuple(_encoding(encoding).encode_ordinary(text))


def count_tokens(provider_model: str, text: str, table: PriceTable) -> tuple[int, bool]:
    """``(tokens, approximate)`` for ``text`` alone, in the model's tokens (no chat framing)."""
    entry = table.entry(provider_model)
    return len(encode(entry.encoding, text)), not entry.exact_tokens


@dataclass(frozen=True)
class Block:
    """One piece of a laid-out prompt."""

    end: int  # token offset just past this piece (its framing included)
    kind: str
    role: str  # "tool-definition" for tools, "system" for system pieces, else the message role
    closes_message: bool  # the last piece of its message (tool definitions: always)
    cache_control: str | None
    empty: bool  # no text: Anthropic cannot cache an empty text block


@dataclass(frozen=True, eq=False)
class Prompt:
    """A laid-out prompt: its tokens (4 bytes each: a log holds many long prompts) and pieces."""

    tokens: array[int]
    blocks: tuple[Block, ...]

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def content_length(self) -> int:
        """Tokens up to the end of the last piece: without the reply priming OpenAI adds after it."""
        return self.blocks[-1].end if self.blocks else 0


def _role(segment: Segment) -> str:
    if segment.kind == "tool":
        return "tool-definition"
    if segment.kind == "system":
        return segment.role or "system"
    assert segment.role is not None  # Segment checks it
    return segment.role


def _message_keys(segments: Sequence[Segment]) -> list[object]:
    """A key per piece; adjacent pieces with the same key are one message."""
    keys: list[object] = []
    for index, segment in enumerate(segments):
        if segment.kind == "tool" or segment.message is None:
            keys.append(("piece", index))
        else:
            keys.append(("message", segment.message, _role(segment)))
    return keys


def layout(entry: ModelEntry, segments: Sequence[Segment]) -> Prompt:
    """The prompt as ``entry``'s provider reads it: its tokens and where each piece ends."""
    framed = entry.rules.framing == "openai_chat"
    keys = _message_keys(segments)
    tokens: list[int] = []
    blocks: list[Block] = []
    for index, segment in enumerate(segments):
        role = _role(segment)
        in_message = segment.kind != "tool"
        opens = index == 0 or keys[index - 1] != keys[index]
        closes = index == len(segments) - 1 or keys[index + 1] != keys[index]
        if framed and in_message and opens:
            tokens += [MESSAGE_START, *encode(entry.encoding, role), MESSAGE_CONTENT]
        tokens += encode(entry.encoding, segment.text)
        if framed and in_message and closes:
            tokens.append(MESSAGE_END)
        blocks.append(
            Block(
                end=len(tokens),
                kind=segment.kind,
                role=role,
                closes_message=closes,
                cache_control=segment.cache_control,
                empty=segment.text == "",
            )
        )
    if framed:
        # The reply is primed after the last message; not a piece of its own, never a breakpoint.
        tokens += [MESSAGE_START, *encode(entry.encoding, "assistant"), MESSAGE_CONTENT]
    return Prompt(array("i", tokens), tuple(blocks))


def extended(reference: Prompt, prompt: Prompt) -> Prompt:
    """``prompt`` had it kept ``reference``'s tokens unchanged: append-only from the reference.

    Up to the end of the reference's last piece the tokens and piece boundaries are the
    reference's (what the cache saw); past it they are this prompt's. A prompt shorter than its
    reference becomes the reference cut at the prompt's length.
    """
    # The reference's reply priming is not conversation: the next request has its reply there.
    cut = reference.content_length
    if prompt.length >= cut:
        tokens = reference.tokens[:cut] + prompt.tokens[cut:]
        blocks = [b for b in reference.blocks if b.end <= cut] + [b for b in prompt.blocks if b.end > cut]
        return Prompt(tokens, tuple(blocks))
    tokens = reference.tokens[: prompt.length]
    kept = [b for b in reference.blocks if b.end <= prompt.length]
    if (not kept or kept[-1].end < prompt.length) and prompt.blocks:
        # Close the cut with this prompt's last piece, so a breakpoint placed on the last piece
        # (Anthropic's automatic caching) still has somewhere to go.
        last = prompt.blocks[-1]
        kept.append(
            Block(prompt.length, last.kind, last.role, True, last.cache_control, empty=False)
        )
    return Prompt(tokens, tuple(kept))


def is_append_only(reference: Prompt, prompt: Prompt) -> bool:
    """``prompt`` extends ``reference`` (or repeats a prefix of it) without changing a token."""
    shared = min(reference.content_length, prompt.length)
    return reference.tokens[:shared] == prompt.tokens[:shared]
