"""What the simulation reads (one request of a log, in provider-neutral pieces) and what it returns.

The explainer builds these from its own parsed log; nothing here parses JSON or talks to a provider.
"""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT_KINDS = ("tool", "system", "message")
CACHE_TTLS = ("5m", "1h")
OPENAI_CACHE_MODES = ("implicit", "explicit")


@dataclass(frozen=True)
class Segment:
    """One piece of a prompt in the order the provider reads it (Anthropic order: tools, system, messages).

    ``message`` groups the pieces of one chat message: two consecutive pieces with the same
    ``message`` number are content blocks of the same message; ``None`` makes the piece a message
    of its own. It matters where a rule counts *messages* rather than blocks (OpenAI's implicit
    breakpoint sits at the end of a message; its chat framing wraps a whole message).
    """

    kind: str  # "tool" | "system" | "message"
    text: str  # a tool's JSON schema; a system block's text; a message's content (tool calls as JSON)
    role: str | None  # the message role for kind == "message" ("user", "assistant", "tool", ...)
    cache_control: str | None  # None, "5m" or "1h": an explicit breakpoint at the END of this piece
    message: int | None = None  # pieces with the same number (and adjacent) form one message

    def __post_init__(self) -> None:
        # A malformed Segment is a bug in the caller, not bad user input: fail loudly.
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"Segment.kind must be one of {SEGMENT_KINDS}, got {self.kind!r}")
        if self.kind == "message" and not self.role:
            raise ValueError("a message Segment needs a role")
        if self.cache_control is not None and self.cache_control not in CACHE_TTLS:
            raise ValueError(
                f"Segment.cache_control must be None or one of {CACHE_TTLS}, got {self.cache_control!r}"
            )


@dataclass(frozen=True)
class ProviderRequest:
    """One request of the log, as a hosted provider would read it."""

    line: int  # 1-based line in the log
    session_id: str | None
    timestamp: float | None  # Unix seconds when the log has them, else None (then nothing expires)
    segments: tuple[Segment, ...]
    model: str | None  # the body's "model" (informational)
    prompt_cache_key: str | None  # OpenAI: requests with different keys never share a cache
    top_level_cache_control: str | None  # Anthropic automatic caching ("5m"/"1h"), if requested
    output_tokens: int  # from the logged response's usage, else 0
    reference: int | None  # index (into the request list) of the earlier request this one extends
    openai_cache_mode: str | None = None  # OpenAI GPT-5.6+ prompt_cache_options.mode; None = implicit

    def __post_init__(self) -> None:
        if self.top_level_cache_control is not None and self.top_level_cache_control not in CACHE_TTLS:
            raise ValueError(
                f"top_level_cache_control must be None or one of {CACHE_TTLS}, "
                f"got {self.top_level_cache_control!r}"
            )
        if self.openai_cache_mode is not None and self.openai_cache_mode not in OPENAI_CACHE_MODES:
            raise ValueError(
                f"openai_cache_mode must be None or one of {OPENAI_CACHE_MODES}, "
                f"got {self.openai_cache_mode!r}"
            )
        if self.output_tokens < 0:
            raise ValueError(f"output_tokens must be >= 0, got {self.output_tokens}")


@dataclass(frozen=True)
class ProviderUsage:
    """What one request reads, writes and costs under one provider's rules."""

    provider_model: str  # "openai:gpt-6.2-sol", "anthropic:claude-sonnet-5-5", ...
    prompt_tokens: int
    cached_tokens: int  # read from cache
    cache_write_tokens: int  # written to cache (Anthropic, OpenAI GPT-5.6+), else 0
    output_tokens: int
    cost_usd: float | None  # None when the table has no price for a part of it
    cost_if_extended_usd: float | None  # had it kept its reference's tokens unchanged (append-only)
    approximate: bool  # token counts approximate (no offline tokenizer for that provider)
    notes: tuple[str, ...]
    # Tokens read from cache had it kept its reference's tokens (== cached_tokens when it did):
    # the difference is what a break cost in tokens, next to cost_if_extended_usd in dollars.
    cached_if_extended_tokens: int | None = None
