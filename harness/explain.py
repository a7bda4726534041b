"""Explain, token by token, where each request of an agent's log leaves the KV prefix cache.

An engine with automatic prefix caching (vLLM) reuses the KV of a new prompt's longest prefix
that it has already computed, in whole blocks. One changed token early in the prompt (a clock
in the system prompt, a re-serialized JSON state) throws away every block after it. This tool
reads the requests an agent sent, renders each one with the model's chat template into the
very token IDs the engine would see, and says for every request:

* how many of its tokens the cache can serve (vLLM's rule, ``harness.prefix``):
  ``cached = B * floor(min(P, L - 1) / B)`` for a prompt of ``L`` tokens sharing ``P`` leading
  tokens with an earlier prompt of its session, ``B`` the block size;
* the first token that differs from that earlier prompt (its index, the text on both sides, what
  the earlier prompt had there) and which message and role it falls in;
* the tokens lost to the break (defined below) and, when the changed text looks like a
  timestamp, a date, a UUID, a counter or reordered JSON keys, a hint saying so.

Run it on a file of OpenAI-style chat requests, one JSON object per line, in the order sent::

    python -m harness.explain requests.jsonl                 # table + one detail block per break
    python -m harness.explain requests.jsonl --json out.json # the same as JSON
    python -m harness.explain requests.jsonl --verify        # also run them on the real engine

A line is ``{"messages": [{"role": ..., "content": ...}, ...], "session_id": ...}``; any other
keys of an OpenAI request body (``model``, ``max_tokens``, ...) are ignored, and so are message
keys other than ``role`` and ``content``. Requests with the same ``session_id`` share one cache;
requests without one share a default session. Sessions never share cache with each other (as
with a per-session ``cache_salt`` or session-affine routing).

Definitions used in the output:

``first_divergence``
    Index of the first prompt token not shared with the *reference*: the earlier prompt of the
    session with the longest common prefix (the most recent one on a tie, since that is the one
    an agent means to extend). Equal to ``prompt_tokens`` when the whole prompt was seen before.
``status``
    ``cold`` (nothing earlier in the session), ``extends`` (the reference is a prefix of this
    prompt: append-only, the good case), ``repeat`` (this prompt is a prefix of the reference),
    ``break`` (the prompt changes a token the reference had).
``lost_tokens``
    The tokens the cache would serve had this prompt kept the reference's tokens unchanged
    (extended it append-only), minus those it does serve; both after block rounding. Zero for
    ``cold``, ``extends`` and ``repeat``; for a ``break`` it is exactly the cached KV the change
    throws away. (``prompt_tokens - predicted_cached_tokens`` would also count the new tokens
    every turn must compute anyway.)

Only prompts are modelled: a request log has no replies, so the KV of generated tokens (which a
real engine also keeps) is not counted; ``--verify`` generates one token per request, which adds
nothing to the cache, so there the prediction must match the engine exactly.

Exit status: 0; 1 when ``--verify`` finds the engine disagreeing with the prediction; 2 for bad
input (a malformed line, a missing file, ...), reported as one line on stderr: ``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.backend import Backend, ChatTokenizer, Message
from harness.errors import UserError
from harness.prefix import (
    Divergence,
    PrefixCacheModel,
    cached_tokens_for,
    common_prefix_len,
    explain_divergence,
)

TOOL_NAME = "harness.explain"
SCHEMA_VERSION = 1
DEFAULT_BLOCK_SIZE = 32  # the CPU engine's block size in this project (harness.engine)
DEFAULT_CONTEXT_TOKENS = 12
GENERATION_PROMPT = "generation-prompt"  # the role shown for tokens after the last message


# --------------------------------------------------------------------------- reading requests


@dataclass(frozen=True)
class ChatRequest:
    """One request of the log: its chat messages, where it came from, which session it is in."""

    line: int  # 1-based line number in the file
    messages: list[Message]
    session_id: str | None  # None: the default session


@dataclass(frozen=True)
class SkippedLine:
    line: int
    error: str


def parse_request(text: str, line: int) -> ChatRequest:
    """Parse one JSONL line; raise ``UserError`` naming the line when it is not a chat request."""

    def bad(problem: str) -> UserError:
        return UserError(f"line {line}: {problem}")

    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(body, dict):
        raise bad(f"expected a JSON object, got {type(body).__name__}")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise bad('no "messages" list')
    if not raw_messages:
        raise bad('"messages" is empty')
    messages: list[Message] = []
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise bad(f"message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise bad(f'message {i} has no "role" string')
        if not isinstance(content, str):
            # Content parts and tool-call-only messages render differently per server; refuse
            # rather than guess at tokens the engine may not have seen.
            raise bad(f'message {i} ({role}) has no "content" string')
        messages.append({"role": role, "content": content})
    session = body.get("session_id")
    if session is not None and (isinstance(session, bool) or not isinstance(session, str | int)):
        raise bad('"session_id" must be a string or an integer')
    return ChatRequest(line, messages, None if session is None else str(session))


def read_requests(
    path: Path,
    skip_bad: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[ChatRequest], list[SkippedLine]]:
    """Read a JSONL file of chat requests, in order. Blank lines are ignored.

    A malformed line raises ``UserError`` and nothing after it is read, unless ``skip_bad``:
    then it is reported through ``warn`` and skipped.
    """
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    requests: list[ChatRequest] = []
    skipped: list[SkippedLine] = []
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise UserError(f"line {number}: not UTF-8 text") from None
                    if not text.strip():
                        continue
                    requests.append(parse_request(text, number))
                except UserError as exc:
                    if not skip_bad:
                        raise UserError(f"{path}: {exc}", exc.exit_code) from None
                    skipped.append(SkippedLine(number, str(exc)))
                    if warn is not None:
                        warn(f"{path}: {exc} (skipped)")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return requests, skipped


# --------------------------------------------------------------------------- rendering


class TemplateRenderer(Protocol):
    """What the explainer needs from a tokenizer: the prompt as sent, and the conversation
    without the generation prompt (to find where each message's tokens start and end)."""

    def render(self, messages: Sequence[Message]) -> list[int]: ...

    def render_conversation(self, messages: Sequence[Message]) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


# ChatTokenizer renders both ways (with and without the generation prompt).
TemplateTokenizer = ChatTokenizer


def message_spans(
    renderer: TemplateRenderer, messages: Sequence[Message], prompt: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Token span ``[start, end)`` of each message (its template tokens included) in the prompt.

    Message ``k`` ends where the rendering of ``messages[:k + 1]`` without a generation prompt
    ends; tokens after the last span are the generation prompt. That is exact whenever that
    rendering is a token prefix of the whole prompt (ChatML: every message ends with
    ``<|im_end|>\\n`` before a special token, so no token crosses a message boundary). A template
    that rewrites earlier turns, or a merge across a boundary, breaks that; the span then ends
    where the two renderings stop agreeing, the closest boundary the tokens allow.
    """
    full = list(prompt) if prompt is not None else renderer.render(messages)
    spans: list[tuple[int, int]] = []
    start = 0
    for k in range(1, len(messages) + 1):
        prefix = renderer.render_conversation(messages[:k])
        end = max(start, common_prefix_len(prefix, full))
        spans.append((start, end))
        start = end
    return spans


def locate_token(spans: Sequence[tuple[int, int]], index: int) -> int | None:
    """The message whose span holds token ``index``; None for the generation prompt (or past it)."""
    for k, (start, end) in enumerate(spans):
        if start <= index < end:
            return k
    return None


# --------------------------------------------------------------------------- hints


@dataclass(frozen=True)
class Hint:
    """Why the changed text probably changed: a kind, the two values, and what to do."""

    kind: str  # timestamp | date | uuid | counter | json_key_order | json_serialization
    old: str
    new: str
    advice: str

    def describe(self) -> str:
        return f"{self.kind}: {_clip(self.old, 40)!r} -> {_clip(self.new, 40)!r}; {self.advice}"


ADVICE = {
    "timestamp": "a clock value changes every request; keep the prefix byte-stable and put the "
    "time after it (at the end), or leave it out",
    "date": "a date in the prefix changes every day; move it after the stable part",
    "uuid": "a per-request ID in the prefix; move IDs to the end of the prompt or out of it",
    "counter": "a number that changes (a step or turn counter?); append it instead of "
    "rewriting it early in the prompt",
    "json_key_order": "the same JSON with its keys in another order; serialize deterministically "
    "(json.dumps(..., sort_keys=True)) or append events instead of rewriting state",
    "json_serialization": "the same JSON serialized differently (spacing/escaping); use one "
    "fixed json.dumps setting everywhere",
}

_HOUR_MINUTE = r"(?P<h>\d{1,2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:[.,]\d+)?)?"
_ISO_DATE = r"\d{4}-\d{2}-\d{2}"
_MONTH = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\.?"
)
_WEEKDAY = (
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday|Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
)
TIMESTAMP_PATTERNS = [
    re.compile(rf"{_ISO_DATE}[T ]{_HOUR_MINUTE}(?:Z|[+-]\d{{2}}:?\d{{2}}|\s?UTC|\s?GMT)?"),
    re.compile(rf"(?<![\d:]){_HOUR_MINUTE}(?:\s?[AaPp]\.?[Mm]\.?)?(?![\d:])"),
    re.compile(r"(?<![\w.])1\d{9}(?:\d{3})?(?:\.\d+)?(?![\w.])"),  # Unix time, s or ms (2001-2033)
]
DATE_PATTERNS = [
    re.compile(rf"(?<!\d){_ISO_DATE}(?!\d)"),
    re.compile(r"(?<!\d)\d{1,2}/\d{1,2}/\d{2,4}(?!\d)"),
    re.compile(rf"\b{_MONTH}\s\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s\d{{4}})?\b"),
    re.compile(rf"\b\d{{1,2}}\s{_MONTH}\s\d{{4}}\b"),
    re.compile(rf"\b{_WEEKDAY}\b"),
]
ID_PATTERNS = [
    re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"),
    # hex request IDs and hashes: 16+ hex digits with at least one letter and one digit
    re.compile(r"\b(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{16,}\b"),
]
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _covers(span: tuple[int, int], position: int) -> bool:
    """Does a match span hold ``position``, or end right at it (a value that grew longer)?"""
    start, end = span
    return start <= position <= end and end > start


def _plausible_time(match: re.Match[str]) -> bool:
    groups = match.groupdict()
    if groups.get("h") is None:
        return True  # the Unix-time pattern has no fields to check
    seconds = groups.get("s")
    hour, minute = int(groups["h"]), int(groups["m"])
    return hour <= 23 and minute <= 59 and (seconds is None or int(seconds) <= 60)


def _match_at(
    patterns: Iterable[re.Pattern[str]],
    text: str,
    position: int,
    check: Callable[[re.Match[str]], bool] | None = None,
) -> str | None:
    for pattern in patterns:
        for match in pattern.finditer(text):
            if _covers(match.span(), position) and (check is None or check(match)):
                return match.group(0)
    return None


def _json_values(text: str) -> list[tuple[int, int, Any]]:
    """Top-level JSON objects and arrays embedded in ``text``: (start, end, value)."""
    decoder = json.JSONDecoder()
    found: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                value, end = None, i
            if isinstance(value, dict | list) and end > i:
                found.append((i, end, value))
                i = end
                continue
        i += 1
    return found


def _key_order_differs(a: Any, b: Any) -> bool:
    """Do the keys two JSON values share appear in a different order anywhere inside them?"""
    if isinstance(a, dict) and isinstance(b, dict):
        shared_a = [k for k in a if k in b]
        shared_b = [k for k in b if k in a]
        return shared_a != shared_b or any(_key_order_differs(a[k], b[k]) for k in shared_a)
    if isinstance(a, list) and isinstance(b, list):
        return any(_key_order_differs(x, y) for x, y in zip(a, b, strict=False))
    return False


def _json_hint(old: str, new: str, position: int) -> Hint | None:
    old_json = [v for v in _json_values(old) if _covers(v[:2], position)]
    new_json = [v for v in _json_values(new) if _covers(v[:2], position)]
    if not old_json or not new_json:
        return None
    (a_start, a_end, a), (b_start, b_end, b) = old_json[0], new_json[0]
    old_text, new_text = old[a_start:a_end], new[b_start:b_end]
    if a == b and old_text != new_text:
        kind = "json_key_order" if _key_order_differs(a, b) else "json_serialization"
        return Hint(kind, old_text, new_text, ADVICE[kind])
    if _key_order_differs(a, b):
        advice = ADVICE["json_key_order"] + " (values changed too)"
        return Hint("json_key_order", old_text, new_text, advice)
    return None


def _counter_hint(old: str, new: str, position: int) -> Hint | None:
    def integer_at(text: str) -> str | None:
        for match in NUMBER.finditer(text):
            start, end = match.span()
            # part of a word (a hex ID, "v2") or a decimal is not a counter
            inside_word = (start > 0 and text[start - 1].isalnum()) or (
                end < len(text) and text[end].isalpha()
            )
            if _covers((start, end), position) and "." not in match.group(0) and not inside_word:
                return match.group(0)
        return None

    a, b = integer_at(old), integer_at(new)
    if a is not None and b is not None and a != b:
        return Hint("counter", a, b, ADVICE["counter"])
    return None


def detect_hint(old: str, new: str) -> Hint | None:
    """Guess why ``old`` became ``new`` from the text around their first difference.

    Only the first change matters (the cache is lost from there on), so each heuristic asks
    whether a value of its kind, in *both* texts, holds the first differing character.
    """
    if old == new:
        return None
    position = common_prefix_len(old, new)  # strings are sequences too
    json_hint = _json_hint(old, new, position)
    if json_hint is not None:
        return json_hint
    for kind, patterns, check in (
        ("uuid", ID_PATTERNS, None),
        ("timestamp", TIMESTAMP_PATTERNS, _plausible_time),
        ("date", DATE_PATTERNS, None),
    ):
        a = _match_at(patterns, old, position, check)
        b = _match_at(patterns, new, position, check)
        if a is not None and b is not None and a != b:
            return Hint(kind, a, b, ADVICE[kind])
    return _counter_hint(old, new, position)


# --------------------------------------------------------------------------- explaining


@dataclass(frozen=True)
class RequestExplanation:
    """Everything the tool says about one request."""

    line: int
    session_id: str | None
    prompt_tokens: int
    predicted_cached_tokens: int
    status: str  # cold | extends | repeat | break
    reference_line: int | None  # the earlier request compared with
    first_divergence: int
    message_index: int | None  # message holding the first divergent token (None: generation prompt)
    role: str | None
    divergence: Divergence | None  # text around first_divergence (None when it is past the end)
    lost_tokens: int
    hint: Hint | None

    @property
    def is_break(self) -> bool:
        return self.status == "break"

    def to_json(self) -> dict[str, Any]:
        d = self.divergence
        previous = d.previous_token if d is not None and self.is_break else None
        return {
            "line": self.line,
            "session_id": self.session_id,
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "status": self.status,
            "reference_line": self.reference_line,
            "first_divergence": self.first_divergence,
            "message_index": self.message_index,
            "role": self.role,
            "before": d.before if d is not None else "",
            "token": d.token if d is not None else "",
            "after": d.after if d is not None else "",
            "previous_token": previous,
            "lost_tokens": self.lost_tokens,
            "hint": self.hint.kind if self.hint is not None else None,
            "hint_detail": self.hint.describe() if self.hint is not None else None,
        }


@dataclass
class _Session:
    cache: PrefixCacheModel
    requests: list[ChatRequest]  # parallel to cache.sequences


def _status(first_divergence: int, prompt_len: int, reference_len: int | None) -> str:
    if reference_len is None:
        return "cold"
    if first_divergence >= prompt_len:
        return "repeat"
    if first_divergence >= reference_len:
        return "extends"
    return "break"


def _most_recent_with_prefix(
    prompt: Sequence[int], seen: Sequence[Sequence[int]], length: int
) -> int | None:
    # Among earlier prompts sharing the longest prefix, the latest is the one the agent extends.
    for i in range(len(seen) - 1, -1, -1):
        if common_prefix_len(prompt, seen[i]) == length:
            return i
    return None


def _role(messages: Sequence[Message], message_index: int | None) -> str:
    return GENERATION_PROMPT if message_index is None else messages[message_index]["role"]


def _render(renderer: TemplateRenderer, request: ChatRequest) -> list[int]:
    try:
        return renderer.render(request.messages)
    except Exception as exc:  # the template itself may refuse (e.g. an unknown role)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = f"the chat template refused the messages: {first}"
        raise UserError(f"line {request.line}: {problem}") from exc


def explain_requests(
    requests: Sequence[ChatRequest],
    renderer: TemplateRenderer,
    block_size: int,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> list[RequestExplanation]:
    """Predict and explain each request's cache hit against the earlier ones of its session."""
    sessions: dict[str | None, _Session] = {}
    results: list[RequestExplanation] = []
    for request in requests:
        if request.session_id not in sessions:
            sessions[request.session_id] = _Session(PrefixCacheModel(block_size), [])
        session = sessions[request.session_id]
        prompt = _render(renderer, request)
        prediction = session.cache.predict(prompt)
        index = prediction.common_prefix
        seen = session.cache.sequences
        ref = _most_recent_with_prefix(prompt, seen, index) if seen else None
        reference = seen[ref] if ref is not None else None
        status = _status(index, len(prompt), len(reference) if reference is not None else None)

        lost = 0
        if reference is not None:
            kept = cached_tokens_for(len(prompt), len(reference), block_size)
            lost = kept - prediction.cached_tokens

        message_index: int | None = None
        role: str | None = None
        divergence: Divergence | None = None
        hint: Hint | None = None
        if index < len(prompt):
            message_index = locate_token(message_spans(renderer, request.messages, prompt), index)
            role = _role(request.messages, message_index)
            divergence = explain_divergence(
                prompt, reference or (), renderer.decode, context_tokens
            )
        if status == "break" and message_index is not None and ref is not None:
            # The hint compares the changed message with the same message of the reference.
            earlier = session.requests[ref].messages
            if message_index < len(earlier) and earlier[message_index]["role"] == role:
                old = earlier[message_index]["content"]
                hint = detect_hint(old, request.messages[message_index]["content"])

        results.append(
            RequestExplanation(
                line=request.line,
                session_id=request.session_id,
                prompt_tokens=len(prompt),
                predicted_cached_tokens=prediction.cached_tokens,
                status=status,
                reference_line=session.requests[ref].line if ref is not None else None,
                first_divergence=index,
                message_index=message_index,
                role=role,
                divergence=divergence,
                lost_tokens=lost,
                hint=hint,
            )
        )
        session.cache.record(prompt)
        session.requests.append(request)
    return results


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class VerifiedRequest:
    """One request run on the engine: the prediction next to the engine's own count."""

    line: int
    session_id: str | None
    prompt_tokens: int  # as the engine saw them
    predicted_cached_tokens: int
    engine_cached_tokens: int

    @property
    def matches(self) -> bool:
        return self.predicted_cached_tokens == self.engine_cached_tokens


def session_salt(session_id: str | None) -> str:
    """The ``cache_salt`` that gives a session its own cache on the engine (never empty)."""
    return f"session-{session_id}" if session_id is not None else "no-session"


def verify(
    requests: Sequence[ChatRequest], backend: Backend, max_tokens: int = 1
) -> list[VerifiedRequest]:
    """Send ``requests`` in order to ``backend``, one cache per session, and compare its cached
    token counts with the prediction made (before each request) at the engine's block size.

    The cache is emptied once at the start; sessions are kept apart by ``cache_salt``.
    ``max_tokens=1`` keeps generated tokens out of the cache (the last sampled token's KV is
    never computed), so the engine holds exactly the prompts the prediction knows about.
    """
    backend.start_variant()
    caches: dict[str | None, PrefixCacheModel] = {}
    results: list[VerifiedRequest] = []
    for request in requests:
        cache = caches.setdefault(request.session_id, PrefixCacheModel(backend.info.block_size))
        prompt = backend.render(request.messages)
        prediction = cache.predict(prompt)
        reply = backend.generate(
            request.messages, max_tokens=max_tokens, cache_salt=session_salt(request.session_id)
        )
        if reply.prompt_token_ids is not None and list(reply.prompt_token_ids) != prompt:
            prompt = list(reply.prompt_token_ids)  # predict from what the engine actually saw
            prediction = cache.predict(prompt)
        cache.record(prompt, reply.output_token_ids or ())
        results.append(
            VerifiedRequest(
                request.line,
                request.session_id,
                reply.prompt_tokens,
                prediction.cached_tokens,
                reply.cached_tokens,
            )
        )
    return results


# --------------------------------------------------------------------------- reporting


def disagreements(
    explanations: Sequence[RequestExplanation], verified: Sequence[VerifiedRequest]
) -> list[int]:
    """Lines where the engine's cached tokens differ from the prediction shown to the user."""
    return [
        e.line
        for e, v in zip(explanations, verified, strict=True)
        if v.engine_cached_tokens != e.predicted_cached_tokens
    ]


def report_json(
    source: Path,
    model: str,
    block_size: int,
    explanations: Sequence[RequestExplanation],
    skipped: Sequence[SkippedLine] = (),
    verified: Sequence[VerifiedRequest] | None = None,
) -> dict[str, Any]:
    """The ``--json`` document. ``tool`` marks it as ours (``--json`` overwrites only those)."""
    rows = [e.to_json() for e in explanations]
    if verified is not None:
        for row, check in zip(rows, verified, strict=True):
            row["engine_cached_tokens"] = check.engine_cached_tokens
            row["engine_matches"] = check.engine_cached_tokens == row["predicted_cached_tokens"]
    prompt = sum(e.prompt_tokens for e in explanations)
    cached = sum(e.predicted_cached_tokens for e in explanations)
    return {
        "tool": TOOL_NAME,
        "schema_version": SCHEMA_VERSION,
        "source": str(source),
        "model": model,
        "block_size": block_size,
        "verified": verified is not None,
        "requests": rows,
        "skipped": [{"line": s.line, "error": s.error} for s in skipped],
        "summary": {
            "requests": len(explanations),
            "prompt_tokens": prompt,
            "predicted_cached_tokens": cached,
            "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
            "breaks": sum(e.is_break for e in explanations),
            "lost_tokens": sum(e.lost_tokens for e in explanations),
        },
    }


def check_json_target(path: Path) -> None:
    """Refuse to overwrite anything but an earlier result of this tool."""
    if not path.exists():
        if not path.parent.is_dir():
            raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
        return
    if not path.is_file():
        raise UserError(f"cannot write {path}: not a regular file")
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        existing = None
    if not (isinstance(existing, dict) and existing.get("tool") == TOOL_NAME):
        raise UserError(f"refusing to overwrite {path}: it exists and is not a {TOOL_NAME} result")


def write_json(path: Path, document: dict[str, Any]) -> None:
    check_json_target(path)
    try:
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def _visible(text: str, width: int = 48, keep: str = "end") -> str:
    """``text`` quoted with its newlines escaped, clipped to ``width`` from the side that matters
    (the end of the text before a break, the start of the text after it)."""
    if len(text) > width:
        text = "…" + text[-(width - 1) :] if keep == "end" else text[: width - 1] + "…"
    return repr(text)


def _where(e: RequestExplanation) -> str:
    if e.status == "cold" or e.first_divergence >= e.prompt_tokens:
        return "-"
    if e.message_index is None:
        return str(e.role)
    return f"msg {e.message_index} ({e.role})"


def print_report(
    explanations: Sequence[RequestExplanation],
    model: str,
    block_size: int,
    verified: Sequence[VerifiedRequest] | None = None,
    console: Any = None,
) -> None:
    """A table with one row per request, then a short detail block per break."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    title = f"prefix-cache explanation: {model}, block size {block_size}"
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("line", "right"),
        ("session", "left"),
        ("prompt", "right"),
        ("cached", "right"),
        ("engine", "right"),
        ("hit", "right"),
        ("status", "left"),
        ("diverges", "right"),
        ("where", "left"),
        ("lost", "right"),
        ("hint", "left"),
    ):
        if name == "engine" and verified is None:
            continue
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    checks = list(verified) if verified is not None else [None] * len(explanations)
    for e, check in zip(explanations, checks, strict=True):
        hit = e.predicted_cached_tokens / e.prompt_tokens if e.prompt_tokens else 0.0
        style = {"break": "bold red", "extends": "green", "repeat": "green"}.get(e.status, "")
        status = Text(e.status, style=style)
        cells: list[Any] = [
            str(e.line),
            e.session_id if e.session_id is not None else "-",
            str(e.prompt_tokens),
            str(e.predicted_cached_tokens),
        ]
        if check is not None:
            ok = check.engine_cached_tokens == e.predicted_cached_tokens
            cells.append(Text(str(check.engine_cached_tokens), style="green" if ok else "bold red"))
        cells += [
            f"{hit:.0%}",
            status,
            "-" if _where(e) == "-" else str(e.first_divergence),
            _where(e),
            str(e.lost_tokens) if e.lost_tokens else "-",
            e.hint.kind if e.hint is not None else "",
        ]
        table.add_row(*cells)
    console.print(table)

    for e in explanations:
        if not e.is_break or e.divergence is None:
            continue
        d = e.divergence
        session = f" (session {e.session_id})" if e.session_id is not None else ""
        console.print(
            Text(
                f"line {e.line}{session}: breaks at token {e.first_divergence} of "
                f"{e.prompt_tokens}, in {_where(e)}; compared with line {e.reference_line}",
                style="bold",
            )
        )
        console.print(Text(f"  before : {_visible(d.before)}"))
        console.print(
            Text(
                f"  now    : {_visible(d.token)}   (line {e.reference_line} had "
                f"{_visible(d.previous_token)})"
            )
        )
        console.print(Text(f"  after  : {_visible(d.after, keep='start')}"))
        console.print(
            Text(
                f"  cost   : {e.predicted_cached_tokens} of {e.prompt_tokens} tokens cached; "
                f"{e.lost_tokens} lost to this break ({e.lost_tokens // block_size} blocks "
                f"of {block_size})"
            )
        )
        if e.hint is not None:
            console.print(Text(f"  hint   : {e.hint.describe()}", style="yellow"))
    if verified is not None:
        bad = disagreements(explanations, verified)
        if bad:
            message = f"the engine disagrees with the prediction on lines {bad}"
            console.print(Text(message, style="bold red"))
        else:
            message = f"the engine agrees with the prediction on all {len(verified)} requests"
            console.print(Text(message, style="green"))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.explain",
        description="Say, token-exactly, where each request of a chat-request log leaves the "
        "KV prefix cache, what text sits there, and what that costs after block rounding.",
    )
    parser.add_argument(
        "requests",
        type=Path,
        help='JSONL file: one OpenAI-style chat request per line, {"messages": [...], '
        '"session_id": ...}, in the order they were sent',
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model whose tokenizer and chat template render the prompts: a local folder or hub "
        "id (default: $KVCACHE_LESSONS_MODEL, else the prepared SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"KV cache block size in tokens (default {DEFAULT_BLOCK_SIZE}; vLLM's CUDA default is "
        "16); with --verify the engine is started with it and its own value is used",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help=f"tokens of text to show on each side of a break (default {DEFAULT_CONTEXT_TOKENS})",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="F",
        help="also write the result as JSON to F (never overwrites a file that is not an earlier "
        "result of this tool)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed lines with a warning instead of stopping at the first one",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also run the requests on the embedded vLLM engine (one cache per session) and "
        "show its cached tokens next to the prediction; exit 1 if any differ",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from harness.model import resolve_model

    if args.block_size <= 0:
        raise UserError(f"--block-size must be a positive number of tokens, got {args.block_size}")
    if args.context < 0:
        raise UserError(f"--context must not be negative, got {args.context}")
    if args.json is not None:
        check_json_target(args.json)  # fail before the work, not after it

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    requests, skipped = read_requests(args.requests, skip_bad=args.skip_bad, warn=warn)
    if not requests:
        raise UserError(f"no requests in {args.requests}")
    spec = resolve_model(args.model)

    block_size = args.block_size
    verified: list[VerifiedRequest] | None = None
    if args.verify:
        from harness.backend import OfflineBackend
        from harness.engine import EngineOptions

        print(f"starting vLLM on {spec.display_name} (block size {block_size})", file=sys.stderr)
        options = EngineOptions(model=spec.name_or_path, block_size=block_size)
        backend = OfflineBackend(options, spec.display_name)
        try:
            if backend.info.block_size != block_size:
                warn(f"the engine uses block size {backend.info.block_size}, not {block_size}")
            block_size = backend.info.block_size  # the prediction must use the engine's
            verified = verify(requests, backend)
        finally:
            backend.close()

    renderer = TemplateTokenizer(spec.name_or_path)
    explanations = explain_requests(requests, renderer, block_size, args.context)
    print_report(explanations, spec.display_name, block_size, verified)
    if args.json is not None:
        document = report_json(
            args.requests, spec.display_name, block_size, explanations, skipped, verified
        )
        write_json(args.json, document)
    if verified is not None:
        return 1 if disagreements(explanations, verified) else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. User errors print one line (``error: ...``) and return their exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # vLLM's engine process re-imports this module: keep the guard
    sys.exit(main())
