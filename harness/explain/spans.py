"""Smart splitting: the volatile spans of a log, found from the traffic, ranked, and fixed.

A *volatile span* is a run of tokens that changes between a session's requests while what
surrounds it stays: a clock in the system prompt, a counter or an ID, a JSON state re-serialized
with its keys moved, a tool list in another order, a message inserted into the history. Each
break of the analysis (``analyze``) has one: it starts at the break's first divergent token and
ends where the two prompts agree again (the first run of ``RESYNC`` tokens of the new prompt that
the reference has too, after the break). Spans of one session that sit in the same message and
are of the same kind are one span, recurring; their lost tokens add up.

Every span comes with the fix for its kind, and the fix can be applied to the log itself
(``apply_fix``), so the claim "this makes the next request extend the previous one" is checked by
running the analysis again on the fixed log:

* a value that changes (timestamp, date, UUID, counter, a stamped note, a JSON state line): the
  line holding it moves to the newest message, where it stays in later requests (append-only:
  lesson 1's RIGHT);
* JSON with its keys in another order or serialized another way: one canonical serialization;
* a reordered tool list: the tools sorted by name; a changed schema: each tool frozen at its first
  definition; tools added later: the session's whole tool set from its first request;
* a message inserted into the history: appended at the end instead; a message removed: kept;
* another Unicode normalization: NFC everywhere.

Under ``--provider``, a hosted provider reads the body in its own pieces (``provider_view``): a
change the local chat template does not render (a rotated tool list, with a template that drops
tools) is a span of that provider's reading (``provider_spans``): its tokens are the provider's,
``provider`` and ``piece`` say whose and where, ``usd_lost`` what it cost each provider that reads
it so. A change both renderings show is one span, the local one, carrying the providers' dollars.

``breakpoints`` places the cache boundary where the session's stable part ends: Anthropic
``cache_control`` positions (at most 4), this project's ``// __CACHE_END__`` marker, and the
padding that puts the boundary on a vLLM block.
"""

from __future__ import annotations

import copy
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from harness.explain.analyze import RequestExplanation
from harness.explain.formats import OPENAI, ChatRequest
from harness.explain.hints import _json_values

if TYPE_CHECKING:  # costs imports this module (through provider_view): no import at run time
    from harness.explain.costs import LogCost

VALUE_KINDS = ("timestamp", "date", "uuid", "counter", "text_inserted")
FIXES = {
    "value": "move the line holding it out of the stable prefix, into the newest message (and leave it "
    "there in later requests: append-only)",
    "json_key_order": "serialize canonically: json.dumps(value, sort_keys=True, separators=(',', ':'))",
    "json_serialization": "serialize canonically: json.dumps(value, sort_keys=True, separators=(',', ':'))",
    "tools_reordered": "send the tools in one fixed order: sorted by name",
    "tool_schema_changed": "keep each tool's definition fixed for the session; put what changes in a message",
    "tools_changed": "send the session's whole tool set from its first request",
    "message_inserted": "append the new message at the end of the history instead of inserting it",
    "message_removed": "keep the history: removing a message recomputes everything after it",
    "unicode_normalization": "normalize text to NFC before it enters the prompt",
    "changed_text": "keep this text fixed, or move it after the stable part",
    "history_truncated": "resend the whole history (append-only) instead of dropping its last messages",
}


@dataclass(frozen=True)
class VolatileSpan:
    session_id: str | None
    line: int  # the first request where it broke the prefix
    message_index: int | None
    start_token: int  # its first token in that request's prompt
    end_token: int  # where that prompt agrees with its reference again
    kind: str
    tokens_lost: int  # over every request it broke, after block rounding
    occurrences: int
    text: str  # the changed text in that first request
    fix: str
    stable_end_token: int  # where the stable part would end with the span moved out of the prefix
    usd_lost: dict[str, float] = field(default_factory=dict)
    # The rendering that found it: None for the local chat template (--model), else the hosted
    # provider ("openai:gpt-4.1") whose own reading of the body holds the change; its tokens then
    # are that provider's, and ``piece`` names where in the body ("tool 0 'search_code'").
    provider: str | None = None
    piece: str | None = None
    approximate: bool = False  # the provider's token counts are approximate

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "line": self.line,
            "message_index": self.message_index,
            "start_token": self.start_token,
            "end_token": self.end_token,
            "kind": self.kind,
            "tokens_lost": self.tokens_lost,
            "occurrences": self.occurrences,
            "text": self.text,
            "fix": self.fix,
            "stable_end_token": self.stable_end_token,
            "usd_lost": {k: round(v, 6) for k, v in self.usd_lost.items()},
            "provider": self.provider,
            "piece": self.piece,
            "approximate": self.approximate,
        }


def fix_for(kind: str) -> str:
    return FIXES["value"] if kind in VALUE_KINDS else FIXES.get(kind, FIXES["changed_text"])


class SpanCollector:
    """The volatile spans of a log, gathered break by break as the analysis goes (``add``)."""

    def __init__(self) -> None:
        self._grouped: dict[tuple[str | None, int | None, str], VolatileSpan] = {}

    def add(self, e: RequestExplanation, dollars: dict[str, float] | None = None) -> None:
        """One request; ``dollars``: per provider, what its break cost (``costs.usd_by_line``)."""
        if not e.is_break or e.reference_line is None:
            return
        kind = e.cause or "changed_text"
        key = (e.session_id, e.message_index, kind)
        dollars = dollars or {}
        if key in self._grouped:
            self._grouped[key] = _merged(self._grouped[key], e.lost_tokens, dollars)
            return
        self._grouped[key] = VolatileSpan(
            session_id=e.session_id,
            line=e.line,
            message_index=e.message_index,
            start_token=e.first_divergence,
            end_token=e.span_end,
            kind=kind,
            tokens_lost=e.lost_tokens,
            occurrences=1,
            # the hint's value is the whole changed value ("2026-11-27 09:31 UTC"), where the
            # tokens may be one digit of it
            text=e.hint.new if e.hint is not None and e.hint.new else e.span_text,
            fix=fix_for(kind),
            stable_end_token=e.span_stable_end,
            usd_lost=dict(dollars),
        )

    def spans(self) -> list[VolatileSpan]:
        """Most tokens lost first."""
        return sorted(self._grouped.values(), key=lambda s: (-s.tokens_lost, s.line))


def find_spans(
    explanations: Sequence[RequestExplanation], usd_lost: dict[int, dict[str, float]] | None = None
) -> list[VolatileSpan]:
    """The volatile spans of the log, most tokens lost first (see the module docstring).

    ``usd_lost``: per line, per provider, the dollars its break cost (``costs.usd_by_line``).
    """
    collector = SpanCollector()
    for e in explanations:
        collector.add(e, (usd_lost or {}).get(e.line))
    return collector.spans()


def _merged(span: VolatileSpan, tokens: int, dollars: dict[str, float]) -> VolatileSpan:
    usd = {p: span.usd_lost.get(p, 0.0) + dollars.get(p, 0.0) for p in {*span.usd_lost, *dollars}}
    return replace(
        span, tokens_lost=span.tokens_lost + tokens, occurrences=span.occurrences + 1, usd_lost=usd
    )


def provider_spans(costs: Sequence[LogCost]) -> list[VolatileSpan]:
    """The spans only a hosted provider's own reading of the bodies shows (``costs.Loss``: a break
    the local rendering does not have, or names otherwise), most tokens lost first.

    The same change found by several providers is one span: its token numbers are in the first
    provider's tokens (``provider``, in ``--provider`` order), ``usd_lost`` has each provider's
    dollars. The rest of a provider's losses are the local spans' (``usd_by_line``).
    """
    grouped: dict[tuple[str | None, object, str], VolatileSpan] = {}
    for cost in costs:
        for loss in cost.losses:
            change = loss.change
            if loss.same_as_local or change is None or change.first_divergence is None:
                continue
            where = change.part if change.part != "messages" else change.piece.message_index
            key = (change.session_id, where, loss.cause)
            dollars = {cost.provider_model: loss.usd}
            span = grouped.get(key)
            if span is not None and span.provider == cost.provider_model:
                grouped[key] = _merged(span, loss.tokens, dollars)  # it recurs
                continue
            if span is not None:  # another provider's reading of the same change: its dollars
                usd = {
                    **span.usd_lost,
                    cost.provider_model: span.usd_lost.get(cost.provider_model, 0.0) + loss.usd,
                }
                grouped[key] = replace(span, usd_lost=usd)
                continue
            hint = change.hint
            grouped[key] = VolatileSpan(
                session_id=change.session_id,
                line=change.line,
                message_index=change.piece.message_index,
                start_token=change.first_divergence,
                end_token=change.end_token if change.end_token is not None else change.first_divergence,
                kind=loss.cause,
                tokens_lost=loss.tokens,
                occurrences=1,
                text=hint.new if hint is not None and hint.new else change.text,
                fix=fix_for(loss.cause),
                stable_end_token=change.stable_end_token or change.first_divergence,
                usd_lost=dollars,
                provider=cost.provider_model,
                piece=change.piece.label,
                approximate=change.approximate,
            )
    return sorted(grouped.values(), key=lambda s: (-s.tokens_lost, s.line))


# --------------------------------------------------------------------------- breakpoints


@dataclass(frozen=True)
class Breakpoints:
    """Where to put the cache boundary for a session whose stable part ends at ``stable_end``."""

    stable_end: int  # tokens of the prompt every request of the session shares
    block_size: int
    anthropic: list[str]  # cache_control positions, at most 4
    marker: str  # where this project's // __CACHE_END__ goes
    pad_tokens: int  # filler that puts the boundary on a block boundary (vLLM keeps whole blocks)

    def to_json(self) -> dict[str, Any]:
        return {
            "stable_end_token": self.stable_end,
            "anthropic_cache_control": self.anthropic,
            "cache_end_marker": self.marker,
            "pad_to_block_tokens": self.pad_tokens,
            "block_size": self.block_size,
        }


def breakpoints(span: VolatileSpan, has_tools: bool, block_size: int) -> Breakpoints:
    where = "the system prompt" if span.message_index in (0, None) else f"message {span.message_index}"
    anthropic = []
    if has_tools:
        anthropic.append("the last tool definition (caches the tool list)")
    anthropic.append(
        f"the last block before the span, in {where}, once the span is moved out (the stable prefix)"
    )
    anthropic.append(
        "the last message of each request (a rolling breakpoint: every turn reads the turn before)"
    )
    pad = (block_size - span.stable_end_token % block_size) % block_size
    marker = (
        f"right after the stable part, before token {span.stable_end_token} (the span's text moved after it)"
    )
    return Breakpoints(span.stable_end_token, block_size, anthropic[:4], marker, pad)


# --------------------------------------------------------------------------- applying a fix


def _text_of(content: Any) -> str | None:
    return content if isinstance(content, str) else None


def _canonical_json(text: str) -> str:
    out, last = [], 0
    for start, end, value in _json_values(text):
        out += [
            text[last:start],
            json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        ]
        last = end
    return "".join(out) + text[last:]


def _tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function")
    return str((function if isinstance(function, dict) else tool).get("name", ""))


def _volatile_line(content: str, snippet: str) -> str | None:
    """The whole line of ``content`` where ``snippet`` (the text up to and with the changed token)
    ends: a value is moved with its label and the rest of its line."""
    if not snippet.strip():
        return None
    at = content.find(snippet)
    if at < 0:
        return None
    last = at + len(snippet) - 1
    start = content.rfind("\n", 0, last) + 1
    end = content.find("\n", last)
    return content[start : len(content) if end < 0 else end + 1]


def apply_fix(
    requests: Sequence[ChatRequest], span: VolatileSpan, values: Sequence[str]
) -> list[ChatRequest]:
    """The log with ``span``'s fix applied to every request of its session (OpenAI-format bodies).

    ``values``: the changed text of each break of the span (the hints' new values), which tells
    which line to move for a value kind.
    """
    session = [r for r in requests if r.session_id == span.session_id and r.format == OPENAI]
    fixed: dict[int, ChatRequest] = {}
    tools_seen: dict[str, dict[str, Any]] = {}
    union: list[dict[str, Any]] = []
    for request in session:
        for tool in request.body.get("tools") or []:
            if _tool_name(tool) not in tools_seen:
                tools_seen[_tool_name(tool)] = tool
                union.append(tool)
    moved: dict[int, str] = {}  # message index -> the line appended to it (kept in later requests)
    inserted_seen: list[dict[str, Any]] = []
    for request in session:
        body = copy.deepcopy(request.body)
        messages = body["messages"]
        kind = span.kind
        if kind in ("tools_reordered",) and body.get("tools"):
            body["tools"] = sorted(body["tools"], key=_tool_name)
        elif kind == "tool_schema_changed" and body.get("tools"):
            body["tools"] = [tools_seen[_tool_name(t)] for t in body["tools"]]
        elif kind == "tools_changed" and body.get("tools") is not None:
            body["tools"] = list(union)
        elif kind in ("json_key_order", "json_serialization"):
            for m in messages:
                if isinstance(m.get("content"), str):
                    m["content"] = _canonical_json(m["content"])
        elif kind == "unicode_normalization":
            for m in messages:
                if isinstance(m.get("content"), str):
                    m["content"] = unicodedata.normalize("NFC", m["content"])
        elif kind == "message_inserted" and span.message_index is not None:
            body["messages"] = _move_inserted(messages, span.message_index, inserted_seen)
        elif kind in VALUE_KINDS or kind == "changed_text":
            index = span.message_index
            if (
                index is not None
                and index < len(messages)
                and isinstance(messages[index].get("content"), str)
            ):
                content = messages[index]["content"]
                line = next((ln for v in values if (ln := _volatile_line(content, v)) is not None), None)
                if line is not None:
                    messages[index]["content"] = content.replace(line, "", 1)
                    for at, text in moved.items():  # earlier requests' moved lines stay where they went
                        if at < len(messages) - 1 and isinstance(messages[at].get("content"), str):
                            messages[at]["content"] += "\n" + text.rstrip("\n")
                    last = len(messages) - 1
                    if isinstance(messages[last].get("content"), str):
                        messages[last]["content"] += "\n" + line.rstrip("\n")
                        moved.setdefault(last, line)
        fixed[request.line] = replace(request, body=body, response=None)
    return [fixed.get(r.line, r) for r in requests]


def _move_inserted(
    messages: list[dict[str, Any]], index: int, seen: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """An inserted message moves to the end of its request; in later requests it stays where it went."""
    inserted = messages[index]
    if inserted in seen or index >= len(messages) - 1:
        return messages
    seen.append(inserted)
    return [*messages[:index], *messages[index + 1 :], inserted]


def span_values(explanations: Sequence[RequestExplanation], span: VolatileSpan) -> list[str]:
    """Snippets that end at a span's changed token, in the new and in the earlier request (the
    text just before the break and the token there): what ``apply_fix`` looks for in the text."""
    snippets: list[str] = []
    for e in explanations:
        if not (e.is_break and e.session_id == span.session_id and e.message_index == span.message_index):
            continue
        if e.divergence is None:
            continue
        tail = e.divergence.before.split("\n")[-1]  # within the line of the change
        snippets += [tail + e.divergence.token, tail + e.divergence.previous_token]
        if e.hint is not None and e.hint.kind == span.kind:
            snippets += [e.hint.new.rstrip("…"), e.hint.old.rstrip("…")]
    return [s for s in snippets if s.strip()]


# --------------------------------------------------------------------------- the suggestion


@dataclass(frozen=True)
class Suggestion:
    """The top span's fix, shown on one real request of the log: before and after."""

    span: VolatileSpan
    breakpoints: Breakpoints
    line: int  # the request shown
    before_status: str
    before_cached: int
    after_status: str
    after_cached: int
    prompt_tokens: int
    after_prompt_tokens: int
    before_text: str  # the message holding the span, before the fix (clipped around the span)
    after_text: str  # the same message and the newest one, after the fix (clipped)
    applied: bool  # False: the fix could not be applied to this body (it is described only)

    def to_json(self) -> dict[str, Any]:
        return {
            "span": self.span.to_json(),
            "breakpoints": self.breakpoints.to_json(),
            "line": self.line,
            "before": {
                "status": self.before_status,
                "cached_tokens": self.before_cached,
                "prompt_tokens": self.prompt_tokens,
            },
            "after": {
                "status": self.after_status,
                "cached_tokens": self.after_cached,
                "prompt_tokens": self.after_prompt_tokens,
            },
            "applied": self.applied,
        }


def _clip_around(text: str, needle: str, width: int = 160) -> str:
    at = max(0, text.find(needle)) if needle else 0
    start = max(0, at - width // 2)
    clipped = text[start : start + width]
    return ("…" if start else "") + clipped + ("…" if start + width < len(text) else "")


def _context_before(text: str, needle: str, width: int = 30) -> str:
    """The text just before ``needle`` in ``text``: where the span was, found again after the fix."""
    at = text.find(needle) if needle else -1
    if at <= 0:
        return ""
    line_start = text.rfind("\n", 0, at) + 1  # a moved value leaves with its whole line
    return text[max(0, line_start - width) : line_start]


def suggest(
    requests: Sequence[ChatRequest],
    explanations: Sequence[RequestExplanation],
    span: VolatileSpan,
    reanalyze: Any,
    block_size: int,
) -> Suggestion:
    """Apply ``span``'s fix to its session and say what it does to the request where it broke.

    ``reanalyze(requests) -> explanations``: the same analysis (renderer, block size, scope)."""
    session = [r for r in requests if r.session_id == span.session_id]
    fixed = apply_fix(session, span, span_values(explanations, span))
    after = {e.line: e for e in reanalyze(fixed)}
    before = {e.line: e for e in explanations}
    shown, original = before[span.line], next(r for r in requests if r.line == span.line)
    changed = next(r for r in fixed if r.line == span.line)
    index = span.message_index if span.message_index is not None else 0
    messages, new_messages = original.messages, changed.messages
    old_text = str(messages[index].get("content")) if index < len(messages) else ""
    new_text = str(new_messages[index].get("content")) if index < len(new_messages) else ""
    last = str(new_messages[-1].get("content"))
    return Suggestion(
        span=span,
        breakpoints=breakpoints(span, bool(original.body.get("tools")), block_size),
        line=span.line,
        before_status=shown.status,
        before_cached=shown.predicted_cached_tokens,
        after_status=after[span.line].status,
        after_cached=after[span.line].predicted_cached_tokens,
        prompt_tokens=shown.prompt_tokens,
        after_prompt_tokens=after[span.line].prompt_tokens,
        before_text=_clip_around(old_text, span.text.strip()),
        after_text=_clip_around(new_text, _context_before(old_text, span.text.strip()))
        + ("\n  [newest message] …" + last[-160:] if index != len(new_messages) - 1 else ""),
        applied=changed.body != original.body,
    )


# --------------------------------------------------------------------------- placing a marker


@dataclass(frozen=True)
class Boundary:
    """Where the part every request shares ends, as a place in a message's text."""

    stable_tokens: int  # tokens every request of the set starts with (the chat template's included)
    message_index: int  # the message the first differing token is in
    offset: int  # characters into that message's content where the marker goes


def stable_boundary(conversations: Sequence[Sequence[dict[str, Any]]], renderer: Any) -> Boundary:
    """The boundary the traffic itself shows: the first token where any request differs from the
    others (the volatile spans' earliest start), turned into a place in the message text where a
    cache marker can be written. Needs at least two requests; ``renderer`` is a ``ChatRenderer``."""
    from harness.explain.analyze import SESSION, explain_requests

    if len(conversations) < 2:
        raise ValueError("a boundary needs at least two requests to compare")
    log = [ChatRequest(i + 1, {"messages": list(c)}, OPENAI, "boundary") for i, c in enumerate(conversations)]
    explained = explain_requests(log, renderer, 1, scope=SESSION)
    stable = min(e.first_divergence for e in explained[1:])
    first = renderer.render(log[0])
    index = renderer.message_at(first, stable)
    if index is None:  # every request is the same up to the generation prompt
        index = len(first.conversation) - 1
    content = str(conversations[0][index].get("content") or "")
    char = first.char_at(stable)
    start = first.text.find(content) if content else -1
    while start >= 0 and start + len(content) < char:  # the copy of the content holding ``char``
        start = first.text.find(content, start + 1)
    if start < 0 or not start <= char <= start + len(content):
        # The difference starts in the template's own text before this message's content (a
        # role header): the stable part ends with the previous message.
        index = max(0, index - 1)
        return Boundary(stable, index, len(str(conversations[0][index].get("content") or "")))
    return Boundary(stable, index, char - start)


def place_marker(messages: Sequence[dict[str, Any]], boundary: Boundary, marker: str) -> list[dict[str, Any]]:
    """``messages`` with ``marker`` written at ``boundary`` (any earlier copy of it removed)."""
    out = [dict(m) for m in messages]
    for m in out:
        if isinstance(m.get("content"), str):
            m["content"] = m["content"].replace(marker, "")
    target = out[boundary.message_index]
    content = str(target.get("content") or "")
    target["content"] = content[: boundary.offset] + marker + content[boundary.offset :]
    return out
