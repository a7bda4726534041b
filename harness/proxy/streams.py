"""A streamed response (server-sent events) put back together as the body the client was given.

The proxy passes every byte of a stream through as it arrives and keeps a copy; when the call
ends, that copy is read here into the one JSON body an unstreamed call would have returned, so a
streamed call and an unstreamed one look alike in the log (and to the explainer):

* **Chat Completions** (``chat.completion.chunk`` events, ``data: [DONE]`` at the end): each
  choice's ``delta`` is accumulated the way the ``openai`` SDK accumulates it (strings appended,
  tool calls merged by their ``index``: the first fragment brings ``id`` and ``function.name``,
  later ones append to ``function.arguments``), ``logprobs.content`` and vLLM's ``token_ids``
  concatenated, ``finish_reason`` kept; top-level fields take their last non-null value, so the
  ``usage`` of the final chunk (sent only when the request set
  ``stream_options.include_usage``) ends up in the body.
* **Anthropic Messages** (``message_start``, ``content_block_start/delta/stop``,
  ``message_delta``, ``message_stop``): the message of ``message_start``, each block grown by its
  deltas (``text_delta``, ``input_json_delta`` parsed into the tool's ``input`` when its block
  stops, ``thinking_delta``, ``signature_delta``, ``citations_delta``), then ``message_delta``'s
  ``stop_reason`` and ``usage`` (its counts are totals: they replace those of ``message_start``,
  as the ``anthropic`` SDK does; vLLM sends ``cache_read_input_tokens`` there).
* **Responses API** (``response.*`` events): ``response.completed`` (or ``.failed``,
  ``.incomplete``) carries the whole final response, usage included; a stream cut before it
  gives the last snapshot (``response.created``/``.in_progress``) with the output items finished
  so far (``response.output_item.done``).

``complete`` says whether the stream's own end marker arrived; an ``error`` event is kept as it
came. Parsing follows the SSE rules (``event:`` and ``data:`` lines, an event ends at a blank
line, several ``data:`` lines joined with a newline, ``:`` comments ignored, CR, LF or CRLF line
ends); an event cut off by the end of the bytes is dropped, as a client would drop it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

CHAT = "chat"
RESPONSES = "responses"
MESSAGES = "messages"
# The path endings of the calls the proxy records, and the API each one is.
API_PATHS = (("/chat/completions", CHAT), ("/responses", RESPONSES), ("/messages", MESSAGES))


def api_of(path: str) -> str | None:
    """Which recorded API a request path is (``None``: forwarded, not recorded)."""
    path = path.rstrip("/")
    for ending, api in API_PATHS:
        if path.endswith(ending):
            return api
    return None


@dataclass(frozen=True)
class SseEvent:
    event: str | None
    data: str


def parse_sse(raw: bytes) -> Iterator[SseEvent]:
    """The complete events of an SSE byte stream, in order (see the module docstring)."""
    text = raw.decode("utf-8", errors="replace")
    event: str | None = None
    data: list[str] = []
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # The last piece has no line end after it: an unfinished line, not a line.
    for line in lines[:-1]:
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data))
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value


@dataclass
class Reassembled:
    """A stream read back into one body."""

    body: dict[str, Any] | None  # None: nothing usable arrived
    complete: bool  # the stream's own end marker arrived
    error: Any = None  # an error event's payload, when the stream carried one
    notes: list[str] = field(default_factory=list)


def reassemble(api: str, raw: bytes) -> Reassembled:
    """The body an unstreamed call of ``api`` would have returned, from the stream's bytes."""
    events = list(parse_sse(raw))
    if api == CHAT:
        return _chat(events)
    if api == MESSAGES:
        return _messages(events)
    return _responses(events)


def _partial_json(text: str) -> Any:
    import jiter  # a dependency of both SDKs

    try:
        return jiter.from_json(text.encode(), partial_mode=True)
    except ValueError:
        return {}


def _load(data: str) -> Any:
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------- Chat Completions


def accumulate(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Merge one ``delta`` into ``acc`` as the ``openai`` SDK does: strings are appended, ``index``
    and ``type`` replaced, objects merged, lists of objects merged by their ``index``, other lists
    extended; a null never erases a value."""
    for key, value in delta.items():
        if value is None:
            acc.setdefault(key, None)
            continue
        current = acc.get(key)
        if current is None:
            if _indexed(value):
                acc[key] = _merge_indexed([], value)
            else:
                acc[key] = copy.deepcopy(value)
        elif key in ("index", "type"):
            acc[key] = value
        elif isinstance(current, str) and isinstance(value, str):
            acc[key] = current + value
        elif isinstance(current, dict) and isinstance(value, dict):
            accumulate(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            acc[key] = _merge_indexed(current, value) if _indexed(value) else current + value
        else:
            acc[key] = value
    return acc


def _indexed(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "index" in v for v in value)
    )


def _merge_indexed(current: list[Any], entries: list[dict[str, Any]]) -> list[Any]:
    for entry in entries:
        index = entry["index"]
        found = next((c for c in current if isinstance(c, dict) and c.get("index") == index), None)
        if found is None:
            current.append(accumulate({}, entry))
        else:
            accumulate(found, entry)
    return current


def _chat(events: list[SseEvent]) -> Reassembled:
    body: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    complete = False
    error = None
    for event in events:
        if event.data.strip() == "[DONE]":
            complete = True
            continue
        chunk = _load(event.data)
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk and "choices" not in chunk:
            error = chunk["error"]
            continue
        if body is None:
            body = {"id": chunk.get("id"), "object": "chat.completion"}
        for key, value in chunk.items():
            if key not in ("choices", "object") and value is not None:
                body[key] = value
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = int(choice.get("index", 0))
            snapshot = choices.setdefault(index, {"index": index, "message": {}, "finish_reason": None})
            delta = choice.get("delta")
            if isinstance(delta, dict):
                accumulate(snapshot["message"], delta)
            for key, value in choice.items():
                if key in ("index", "delta") or value is None:
                    continue
                if key == "token_ids" and isinstance(value, list):
                    snapshot["token_ids"] = snapshot.get("token_ids", []) + value
                elif key == "logprobs" and isinstance(value, dict):
                    logprobs = snapshot.setdefault("logprobs", {})
                    for part in ("content", "refusal"):
                        if isinstance(value.get(part), list):
                            logprobs[part] = (logprobs.get(part) or []) + value[part]
                else:
                    snapshot[key] = value
    if body is None:
        return Reassembled(None, complete, error)
    for snapshot in choices.values():
        message = snapshot["message"]
        message["role"] = message.get("role") or "assistant"
        message.setdefault("content", None)
        for call in message.get("tool_calls") or []:
            call.pop("index", None)  # a stream's bookkeeping, not part of the message
    body["choices"] = [choices[i] for i in sorted(choices)]
    return Reassembled(body, complete, error)


# --------------------------------------------------------------------------- Anthropic Messages

_TOOL_BLOCKS = ("tool_use", "server_tool_use", "mcp_tool_use")


def _messages(events: list[SseEvent]) -> Reassembled:
    message: dict[str, Any] | None = None
    inputs: dict[int, str] = {}  # block index -> the tool input's JSON so far
    complete = False
    error = None
    notes: list[str] = []

    def finish_input(index: int) -> None:
        text = inputs.pop(index, None)
        if message is None or text is None or not text.strip():
            return
        block = message["content"][index]
        try:
            block["input"] = json.loads(text)
        except json.JSONDecodeError:
            # Cut off mid-argument: what the anthropic SDK gives its caller, the JSON read in
            # partial mode (an unfinished string is left out).
            block["input"] = _partial_json(text)
            notes.append(f"content block {index}: the tool input was cut off: {text[-40:]!r}")

    for event in events:
        data = _load(event.data)
        if not isinstance(data, dict):
            continue
        kind = data.get("type") or event.event
        if kind == "error":
            error = data.get("error", data)
        elif kind == "message_start" and isinstance(data.get("message"), dict):
            message = copy.deepcopy(data["message"])
            message["content"] = list(message.get("content") or [])
        elif message is None:
            continue
        elif kind == "content_block_start" and isinstance(data.get("content_block"), dict):
            index = int(data.get("index", len(message["content"])))
            while len(message["content"]) <= index:
                message["content"].append({})
            message["content"][index] = copy.deepcopy(data["content_block"])
            if message["content"][index].get("type") in _TOOL_BLOCKS:
                inputs[index] = ""
        elif kind == "content_block_delta" and isinstance(data.get("delta"), dict):
            index = int(data.get("index", 0))
            if index >= len(message["content"]):
                continue
            block, delta = message["content"][index], data["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = block.get("text", "") + str(delta.get("text", ""))
            elif dtype == "input_json_delta":
                inputs[index] = inputs.get(index, "") + str(delta.get("partial_json", ""))
            elif dtype == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
            elif dtype == "signature_delta":
                block["signature"] = delta.get("signature")
            elif dtype == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        elif kind == "content_block_stop":
            finish_input(int(data.get("index", 0)))
        elif kind == "message_delta":
            for key, value in (data.get("delta") or {}).items():
                message[key] = value
            usage = message.setdefault("usage", {})
            for key, value in (data.get("usage") or {}).items():
                if value is not None:  # totals: they replace message_start's counts
                    usage[key] = value
        elif kind == "message_stop":
            complete = True
    for index in list(inputs):
        finish_input(index)
    return Reassembled(message, complete, error, notes)


# --------------------------------------------------------------------------- Responses API

_FINAL = ("response.completed", "response.failed", "response.incomplete")


def _responses(events: list[SseEvent]) -> Reassembled:
    final: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None
    items: dict[int, Any] = {}
    error = None
    for event in events:
        data = _load(event.data)
        if not isinstance(data, dict):
            continue
        kind = data.get("type") or event.event
        if kind in _FINAL and isinstance(data.get("response"), dict):
            final = data["response"]
        elif kind in ("response.created", "response.in_progress", "response.queued") and isinstance(
            data.get("response"), dict
        ):
            snapshot = data["response"]
        elif kind == "response.output_item.done":
            items[int(data.get("output_index", len(items)))] = data.get("item")
        elif kind == "error":
            error = data.get("error", data)
    if final is not None:
        return Reassembled(final, True, error)
    if snapshot is None:
        return Reassembled(None, False, error)
    partial = copy.deepcopy(snapshot)
    partial["output"] = [items[i] for i in sorted(items)]
    notes = ["the stream ended before response.completed: the last snapshot, with the output items finished"]
    return Reassembled(partial, False, error, notes)
