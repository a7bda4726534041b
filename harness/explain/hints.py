"""Why a prompt changed where it did: the kind of value that broke the prefix, and the fix.

Only the first change matters (the cache is lost from there on), so each heuristic asks whether
a value of its kind, in *both* the earlier and the new text, holds the first differing
character: a clock, a date, a UUID or request ID, a counter, the same JSON with its keys in
another order or serialized differently, the same text in another Unicode normalization.
Before the text, the structure: a tool list reordered, one tool's schema changed, tools added
or removed, a message inserted into or removed from the middle of the history.

Used by the explainer on every break, and by lesson 2 to name what its in-place edit changed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.prefix import common_prefix_len


@dataclass(frozen=True)
class Hint:
    """Why the changed text probably changed: a kind, the two values, and what to do."""

    kind: str  # timestamp | date | uuid | counter | json_key_order | json_serialization | ... (ADVICE)
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
    "text_inserted": "text was inserted before stable text (a per-request note or reminder?); "
    "append it at the end of the prompt instead",
    "unicode_normalization": "the same text in another Unicode normalization (a composed vs a "
    "decomposed accent); normalize text (unicodedata.normalize('NFC', ...)) before it enters the prompt",
    "tools_reordered": "the same tools in another order; the tool list sits at the top of the prompt, "
    "so sort it once (e.g. by name) and send it identically every request",
    "tool_schema_changed": "a tool's definition changed; keep tool schemas fixed and put what "
    "changes (limits, dates, state) into messages at the end",
    "tools_changed": "a tool was added or removed; keep one fixed tool list for the session (or "
    "add new tools at the end of the list, never in the middle)",
    "message_inserted": "a message was inserted into the middle of the history; everything after it "
    "is recomputed: append new messages at the end",
    "message_removed": "a message was removed from the middle of the history (compaction or "
    "truncation?); everything after it is recomputed: compact rarely, and keep the kept part's "
    "start byte-identical",
    "history_truncated": "the request ends where the one it extends went on (a retry or a rollback "
    "that dropped the last messages?); resend the whole history, or start from a prefix that was cached",
}

_HOUR_MINUTE = r"(?P<h>\d{1,2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:[.,]\d+)?)?"
_ISO_DATE = r"\d{4}-\d{2}-\d{2}"
_MONTH = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\.?"
)
_WEEKDAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday|Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
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
    if unicodedata.normalize("NFC", old) == unicodedata.normalize("NFC", new):
        position = common_prefix_len(old, new)
        return Hint(
            "unicode_normalization",
            old[position : position + 12],
            new[position : position + 12],
            ADVICE["unicode_normalization"],
        )
    position = common_prefix_len(old, new)  # strings are sequences too
    json_hint = _json_hint(old, new, position)
    if json_hint is not None and "values changed too" not in json_hint.advice:
        return json_hint  # the same data, other text: the serialization is the whole story
    # A JSON document whose values changed *and* whose keys moved somewhere: what sits at the
    # first difference (a counter, a clock) is what broke the prefix; name that first.
    for kind, patterns, check in (
        ("uuid", ID_PATTERNS, None),
        ("timestamp", TIMESTAMP_PATTERNS, _plausible_time),
        ("date", DATE_PATTERNS, None),
    ):
        a = _match_at(patterns, old, position, check)
        b = _match_at(patterns, new, position, check)
        if a is not None and b is not None and a != b:
            return Hint(kind, a, b, ADVICE[kind])
    counter = _counter_hint(old, new, position)
    if counter is not None:
        return counter
    return json_hint or _insertion_hint(old, new, position)


def _insertion_hint(old: str, new: str, position: int) -> Hint | None:
    """Text put in front of what the earlier prompt had there (a per-request reminder, a stamped
    note): named by the volatile value it carries, when it carries one."""
    rest = old[position:]
    if len(new) <= len(old) or not rest or not new.endswith(rest):
        return None
    inserted = new[position : len(new) - len(rest)]
    for kind, patterns, check in (
        ("uuid", ID_PATTERNS, None),
        ("timestamp", TIMESTAMP_PATTERNS, _plausible_time),
        ("date", DATE_PATTERNS, None),
    ):
        for pattern in patterns:
            match = pattern.search(inserted)
            if match is not None and (check is None or check(match)):
                advice = f"a {kind} was inserted before stable text; " + ADVICE[kind]
                return Hint(kind, "", _clip(inserted, 60), advice)
    return Hint("text_inserted", "", _clip(inserted, 60), ADVICE["text_inserted"])


# --------------------------------------------------------------------------- structure


Message = dict[str, Any]


def message_text(message: Message) -> str:
    """A chat message's text as a template sees it: content, then its tool calls as JSON (in
    their own key order, which a template's ``tojson`` keeps)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    if message.get("tool_calls"):
        text += json.dumps(message["tool_calls"], ensure_ascii=False)
    return text


def _tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function")
    return str((function if isinstance(function, dict) else tool).get("name", ""))


def tools_hint(old: Sequence[dict[str, Any]] | None, new: Sequence[dict[str, Any]] | None) -> Hint | None:
    """What happened to the tool list, when it is not the same list."""
    old, new = list(old or []), list(new or [])
    if old == new:
        return None
    old_names, new_names = [_tool_name(t) for t in old], [_tool_name(t) for t in new]
    if sorted(old_names) != sorted(new_names):
        gone = sorted(set(old_names) - set(new_names))
        added = sorted(set(new_names) - set(old_names))
        detail = ", ".join([*(f"-{n}" for n in gone), *(f"+{n}" for n in added)]) or "duplicates"
        return Hint("tools_changed", ", ".join(old_names), detail, ADVICE["tools_changed"])
    if old_names != new_names:
        first = next(i for i, (a, b) in enumerate(zip(old_names, new_names, strict=True)) if a != b)
        return Hint(
            "tools_reordered",
            f"#{first} {old_names[first]}",
            f"#{first} {new_names[first]}",
            ADVICE["tools_reordered"],
        )
    by_name = dict(zip(old_names, old, strict=True))
    for name, tool in zip(new_names, new, strict=True):
        if by_name[name] != tool:
            before, after = json.dumps(by_name[name], sort_keys=True), json.dumps(tool, sort_keys=True)
            if before == after:  # the same schema, its keys in another order
                return Hint("tool_schema_changed", name, f"{name} (keys reordered)", ADVICE["json_key_order"])
            at = common_prefix_len(before, after)
            return Hint(
                "tool_schema_changed",
                f"{name}: …{before[max(0, at - 20) : at + 20]}",
                f"{name}: …{after[max(0, at - 20) : at + 20]}",
                ADVICE["tool_schema_changed"],
            )
    return None


def history_hint(old: Sequence[Message], new: Sequence[Message], index: int) -> Hint | None:
    """A message inserted at or removed from ``index``, the rest of the history kept."""
    if index >= len(old) or index >= len(new) or old[index] == new[index]:
        return None
    rest = len(old) - index
    if rest > 0 and list(new[index + 1 : index + 1 + rest]) == list(old[index:]) and len(new) > index + 1:
        added = new[index]
        return Hint(
            "message_inserted",
            f"message {index}: {old[index].get('role')}",
            f"message {index}: {added.get('role')} {_clip(message_text(added), 40)!r}",
            ADVICE["message_inserted"],
        )
    kept = list(old[index + 1 :])
    if kept and list(new[index : index + len(kept)]) == kept[: len(new) - index]:
        gone = old[index]
        removed = f"message {index}: {gone.get('role')} {_clip(message_text(gone), 40)!r}"
        return Hint(
            "message_removed",
            removed,
            f"message {index}: {new[index].get('role')}",
            ADVICE["message_removed"],
        )
    return None


def explain_change(
    old: Sequence[Message],
    new: Sequence[Message],
    old_tools: Sequence[dict[str, Any]] | None,
    new_tools: Sequence[dict[str, Any]] | None,
    message_index: int | None,
) -> Hint | None:
    """Why a request broke from its reference, given where (which message) it broke.

    The tool list first, when it changed and the message holding the break kept its own text
    (templates render the tools inside a message, usually the system message); then the
    history's structure; then the changed message's text.
    """
    tools = tools_hint(old_tools, new_tools)
    if message_index is None:
        return tools
    same_text = (
        message_index < len(old)
        and message_index < len(new)
        and (message_text(old[message_index]) == message_text(new[message_index]))
    )
    if tools is not None and (same_text or message_index >= len(old)):
        return tools
    structure = history_hint(old, new, message_index)
    if structure is not None:
        return structure
    both = message_index < len(old) and message_index < len(new)
    if both and old[message_index].get("role") == new[message_index].get("role"):
        return detect_hint(message_text(old[message_index]), message_text(new[message_index]))
    return tools
