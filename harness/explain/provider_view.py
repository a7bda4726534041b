"""A request as a hosted provider reads it, and where it first differs from the request it meant to extend.

The analysis (``analyze``) finds breaks on the *local* rendering: the chat template of ``--model``.
A hosted API does not run that template. It reads the body in its own pieces, in the order it
documents (Anthropic: tools, then system, then messages; OpenAI: the tool list and the
instructions or system/developer messages before the conversation), and counts them in its own
tokens. So a change the local template does not render (most small models' templates drop the
tool list) still breaks the provider's cache, and only this view can name it.

``segments_of`` lays a body out as those pieces (``harness.providers.Segment``, what the
simulation prices); ``first_change`` compares a request with its reference piece by piece and
says, in the provider's terms, what changed first:

* which piece: ``tool 0 'search_code'``, ``system block 0``, ``message 3 (user)``, the
  ``instructions``, or the reply priming after the last message (a history cut short);
* the part it belongs to, in the providers' own vocabulary: ``tools``, ``system``, ``messages``
  (what Anthropic's and OpenAI's cache diagnostics name);
* the text on both sides of the first differing character, in whole characters;
* with a provider's table entry, the token offset in that provider's tokens (``layout``: exact
  text tokens for OpenAI, approximate elsewhere), where the two prompts agree again
  (``harness.prefix.resync``), and the stable part;
* a hint from the same heuristics the local analysis uses (``hints.explain_change``,
  ``hints.tools_hint``), run on the conversation as the provider reads it (each message's
  pieces joined; Anthropic's system blocks as one system message).

With a table entry the verdict is the simulation's own: a request breaks exactly when
``harness.providers.tokens.is_append_only`` says it does not extend its reference, so every
dollar the simulation says a break cost has a change here to name it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.explain.formats import ANTHROPIC, ChatRequest, chain_items
from harness.explain.hints import ADVICE, Hint, _tool_name, explain_change, tools_hint
from harness.prefix import common_prefix_len, resync
from harness.providers import ModelEntry, Segment
from harness.providers.tokens import Prompt, is_append_only, layout

PART_OF_KIND = {"tool": "tools", "system": "system", "message": "messages", "priming": "messages"}
CONTEXT_CHARS = 40  # characters of text shown on each side of a change


@dataclass(frozen=True)
class Piece:
    """One piece of a prompt as a provider reads it, named the way a person finds it in the body."""

    kind: str  # "tool" | "system" | "message" | "priming" (the reply priming after the last message)
    label: str  # "tool 0 'search_code'", "system block 1", "instructions", "message 3 (user)"
    message_index: int | None  # index in the conversation as the provider reads it (tools: None)
    role: str | None
    name: str | None = None  # a tool's name

    @property
    def part(self) -> str:
        return PART_OF_KIND[self.kind]


@dataclass(frozen=True)
class PieceChange:
    """The first difference between a request and its reference, in one provider's reading."""

    line: int
    reference_line: int
    session_id: str | None
    provider_model: str | None  # whose tokens the offsets are in; None: compared piece by piece only
    piece: Piece  # where the request differs
    previous: Piece | None  # what the reference had there (None: the reference ended there)
    before: str  # the text just before the first differing character
    text: str  # the request's text from there
    previous_text: str  # the reference's text from there
    hint: Hint | None
    first_divergence: int | None = None  # first differing token, in the provider's tokens
    end_token: int | None = None  # where the two prompts agree again (``harness.prefix.resync``)
    stable_end_token: int | None = None  # the stable part's end, with the change moved out
    prompt_tokens: int | None = None  # the request's length in the provider's tokens
    approximate: bool = False  # the provider's token counts are approximate

    @property
    def part(self) -> str:
        return self.piece.part

    @property
    def cause(self) -> str:
        """The kind of change, as ``lost_by_cause_usd`` counts it (``changed_text``: no heuristic fits)."""
        return self.hint.kind if self.hint is not None else "changed_text"

    def where(self) -> str:
        """Where it broke, for a sentence: "the tool list", "the system prompt", "message 3 (user)"."""
        if self.piece.kind == "tool":
            return "the tool list"
        if self.piece.label.startswith("system block"):
            return "the system prompt"
        return "the instructions" if self.piece.label == "instructions" else self.piece.label

    def headline(self) -> str:
        """What changed, in one phrase: "tool 0 'search_code' -> 'read_file'"."""
        if self.piece.kind == "tool" and self.previous is not None and self.previous.kind == "tool":
            if self.previous.name != self.piece.name:
                return f"{self.previous.label} -> {self.piece.name!r}"
            return f"{self.piece.label}: its definition changed"
        if self.previous is not None and self.previous.label != self.piece.label:
            return f"{self.previous.label} -> {self.piece.label}"
        return self.piece.label

    def to_json(self) -> dict[str, Any]:
        return {
            "reference_line": self.reference_line,
            "provider": self.provider_model,
            "part": self.part,
            "piece": self.piece.label,
            "previous_piece": self.previous.label if self.previous is not None else None,
            "first_divergence": self.first_divergence,
            "end_token": self.end_token,
            "prompt_tokens": self.prompt_tokens,
            "approximate": self.approximate,
            "before": self.before,
            "text": self.text,
            "previous_text": self.previous_text,
            "cause": self.cause,
            "hint": self.hint.kind if self.hint is not None else None,
            "hint_detail": self.hint.describe() if self.hint is not None else None,
        }


# --------------------------------------------------------------------------- the body as pieces


def ttl_of(block: Any) -> str | None:
    """A block's ``cache_control`` as a breakpoint lifetime: "5m", "1h", or None."""
    control = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(control, dict):
        return None
    return "1h" if control.get("ttl") == "1h" else "5m"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text(v.get("text", v) if isinstance(v, dict) else v) for v in value)
    return json.dumps(value, ensure_ascii=False)


def _block_text(block: dict[str, Any]) -> str:
    """A content block's text; blocks without text (tool calls, images) stand as their JSON."""
    kind = block.get("type")
    if kind in ("text", "input_text", "output_text"):
        return str(block.get("text", ""))
    if kind == "tool_result":
        return _text(block.get("content", ""))
    return json.dumps({k: v for k, v in block.items() if k != "cache_control"}, ensure_ascii=False)


def _message_pieces(
    out: list[tuple[Segment, Piece]], number: int, index: int, role: str, content: Any, label: str
) -> None:
    kind = "system" if role in ("system", "developer") else "message"
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
    for block in blocks:
        block = block if isinstance(block, dict) else {"type": "text", "text": str(block)}
        segment = Segment(kind, _block_text(block), role, ttl_of(block), number)
        out.append((segment, Piece(kind, label, index, role)))


def _read(request: ChatRequest) -> list[tuple[Segment, Piece]]:
    """The request's pieces in the order the provider reads them, each with its name."""
    body = request.body
    out: list[tuple[Segment, Piece]] = [
        (
            Segment("tool", json.dumps(tool, ensure_ascii=False), None, ttl_of(tool)),
            Piece("tool", f"tool {k} {_tool_name(tool)!r}", None, None, _tool_name(tool)),
        )
        for k, tool in enumerate(body.get("tools") or [])
    ]
    offset = 0  # a top-level system prompt is message 0 of the conversation, as vLLM converts it
    if request.format == ANTHROPIC and body.get("system"):
        system = body["system"]
        blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
        for k, block in enumerate(blocks):
            out.append(
                (
                    Segment("system", _text(block.get("text", "")), "system", ttl_of(block)),
                    Piece("system", f"system block {k}", 0, "system"),
                )
            )
        offset = 1
    if "messages" in body:
        for number, message in enumerate(body["messages"]):
            role = str(message.get("role"))
            label = f"message {number} ({role})"  # the body's own index: where a person finds it
            _message_pieces(out, number, number + offset, role, message.get("content"), label)
            if message.get("tool_calls"):
                kind = "system" if role in ("system", "developer") else "message"
                calls = json.dumps(message["tool_calls"], ensure_ascii=False)
                out.append(
                    (Segment(kind, calls, role, None, number), Piece(kind, label, number + offset, role))
                )
        return out
    # An OpenAI Responses API body: instructions, then the input items (a string is one user
    # message), with a previous_response_id chain written out as the hosted API reads it.
    if body.get("instructions"):
        out.append(
            (
                Segment("system", _text(body["instructions"]), "developer", None),
                Piece("system", "instructions", 0, "developer"),
            )
        )
        offset = 1
    for number, item in enumerate(chain_items(request)):
        if not isinstance(item, dict):
            continue
        kind = str(item.get("type", "message"))
        if kind == "message" or "role" in item:
            role = str(item.get("role"))
            _message_pieces(
                out, number, number + offset, role, item.get("content"), f"input {number} ({role})"
            )
            continue
        role = "tool" if kind.endswith("_output") else "assistant"
        text = _text(item.get("output")) if kind.endswith("_output") else json.dumps(item, ensure_ascii=False)
        piece = Piece("message", f"input {number} ({kind})", number + offset, role)
        out.append((Segment("message", text, role, None, number), piece))
    return out


def segments_of(request: ChatRequest) -> tuple[Segment, ...]:
    """The prompt as a hosted provider reads it: tools, system, then messages, block by block."""
    return tuple(segment for segment, _ in _read(request))


def conversation_of(pieces: Sequence[tuple[Segment, Piece]]) -> list[dict[str, Any]]:
    """The messages as the provider reads them (a message's pieces joined): what the hints compare."""
    messages: dict[int, dict[str, Any]] = {}
    for segment, piece in pieces:
        if piece.message_index is None:
            continue
        held = messages.setdefault(piece.message_index, {"role": piece.role, "content": None})
        held["content"] = segment.text if held["content"] is None else held["content"] + "\n" + segment.text
    return [messages[i] for i in sorted(messages)]


# --------------------------------------------------------------------------- the first change


def _same(a: Segment, b: Segment) -> bool:
    # A cache_control marker is not a token: moving a breakpoint changes nothing in the prefix.
    return (a.kind, a.text, a.role) == (b.kind, b.text, b.role)


def _block_at(prompt: Prompt, offset: int) -> int | None:
    """The piece holding token ``offset``; None past the last piece (the reply priming)."""
    return next((j for j, block in enumerate(prompt.blocks) if block.end > offset), None)


class Reading:
    """One provider's reading of a log: each request's pieces and, with a table entry, its tokens.

    A request is read once as itself and is usually the next one's reference: the latest request
    of each of the most recently seen sessions is kept for that (not every request: a large log's
    tokens would not fit), any other reference is read again.
    """

    KEEP_SESSIONS = 256

    def __init__(self, entry: ModelEntry | None = None) -> None:
        self.entry = entry
        self._latest: OrderedDict[str | None, tuple[int, list[tuple[Segment, Piece]], Prompt | None]] = (
            OrderedDict()
        )

    def read(self, request: ChatRequest) -> tuple[list[tuple[Segment, Piece]], Prompt | None]:
        held = self._latest.get(request.session_id)
        if held is not None and held[0] == request.line:
            return held[1], held[2]
        pieces = _read(request)
        prompt = layout(self.entry, [segment for segment, _ in pieces]) if self.entry is not None else None
        if held is None or held[0] < request.line:  # a reference read again does not replace the latest
            self._latest[request.session_id] = (request.line, pieces, prompt)
            self._latest.move_to_end(request.session_id)
            if len(self._latest) > self.KEEP_SESSIONS:
                self._latest.popitem(last=False)
        return pieces, prompt


def first_change(
    reference: ChatRequest,
    request: ChatRequest,
    entry: ModelEntry | None = None,
    reading: Reading | None = None,
    span: bool = True,
) -> PieceChange | None:
    """Where ``request`` first stops extending ``reference`` as a provider reads them (None: it extends).

    With ``entry`` (a provider's row of the rules table) the verdict and the offsets are in that
    provider's tokens, exactly as its simulation sees them; without it, piece by piece. A caller
    comparing a whole log passes one ``Reading`` of that entry, so each request is laid out once.
    ``span=False`` skips where the prompts agree again (``end_token``, ``stable_end_token``: a
    volatile span's extent, the costly part on long prompts).
    """
    reading = reading if reading is not None else Reading(entry)
    entry = reading.entry
    (old, before_prompt), (new, after_prompt) = reading.read(reference), reading.read(request)
    old_segments = [segment for segment, _ in old]
    new_segments = [segment for segment, _ in new]
    first = end = stable = length = None
    if entry is not None and before_prompt is not None and after_prompt is not None:
        if is_append_only(before_prompt, after_prompt):
            return None
        offset = common_prefix_len(before_prompt.tokens[: before_prompt.content_length], after_prompt.tokens)
        at, was = _block_at(after_prompt, offset), _block_at(before_prompt, offset)
        first, length = offset, after_prompt.length
        if span:
            end, ref_end = resync(after_prompt.tokens, before_prompt.tokens, offset)
            # With the change moved out, the reference's tokens but the changed ones would be stable.
            stable = max(offset, before_prompt.length - (ref_end - offset))
    else:
        shared = min(len(old), len(new))
        at = next((i for i in range(shared) if not _same(old_segments[i], new_segments[i])), None)
        if at is None and len(new) >= len(old):
            return None  # the same pieces, and more: append-only
        was = at
    old_conversation, new_conversation = conversation_of(old), conversation_of(new)
    old_tools, new_tools = reference.body.get("tools"), request.body.get("tools")
    if at is None:
        # The request ends where its reference went on: a history cut short (a retry, a rollback).
        piece = Piece(
            "priming", "the reply priming after the last message", len(new_conversation), "assistant"
        )
        hint: Hint | None = Hint(
            "history_truncated",
            f"{len(old_conversation)} messages",
            f"{len(new_conversation)} messages",
            ADVICE["history_truncated"],
        )
        new_text = ""
    else:
        piece = new[at][1]
        new_text = new_segments[at].text
        if piece.kind == "tool":
            hint = tools_hint(old_tools, new_tools)
        else:
            hint = explain_change(
                old_conversation, new_conversation, old_tools, new_tools, piece.message_index
            )
    previous = old[was][1] if was is not None and was < len(old) else None
    old_text = old_segments[was].text if was is not None and was < len(old) else ""
    position = common_prefix_len(old_text, new_text)  # type: ignore[arg-type]  # str is a Sequence too
    return PieceChange(
        line=request.line,
        reference_line=reference.line,
        session_id=request.session_id,
        provider_model=entry.key if entry is not None else None,
        piece=piece,
        previous=previous,
        before=new_text[max(0, position - CONTEXT_CHARS) : position],
        text=new_text[position : position + CONTEXT_CHARS],
        previous_text=old_text[position : position + CONTEXT_CHARS],
        hint=hint,
        first_divergence=first,
        end_token=end,
        stable_end_token=stable,
        prompt_tokens=length,
        approximate=entry is not None and not entry.exact_tokens,
    )
