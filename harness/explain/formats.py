"""Reading a request log: one JSON record per line, in the order the requests were sent.

A record is a request body, or a body wrapped with its response the way gateways and tracing
tools write them. Every line is checked here, cheaply and before anything slow starts, so a
malformed line stops the run with one ``line N: ...`` error (or is skipped with ``--skip-bad``).

Request bodies:

* **OpenAI Chat Completions** (``{"messages": [...], "tools": [...], ...}``): string content or
  content parts, ``tool_calls`` with ``"content": null``, ``tool`` messages with
  ``tool_call_id``, ``name``, ``developer`` messages.
* **Anthropic Messages** (``{"system": ..., "messages": [...], "max_tokens": N, ...}``): system
  as a string or text blocks, content blocks ``text``, ``image``, ``tool_use``,
  ``tool_result``, ``thinking``, ``tools`` with ``input_schema``, ``cache_control``.

A body is Anthropic when something only Anthropic has is there (a top-level ``system`` or
``cache_control``, a ``tool_use``/``tool_result`` block, a tool with ``input_schema``, a wrapper
URL ending in ``/v1/messages``), OpenAI when something only OpenAI has is there (``system``,
``developer`` or ``tool`` roles, ``tool_calls``, ``image_url`` parts, a tool with
``function``); plain user/assistant text renders the same either way and is read as OpenAI.

Wrappers (the request and, when there, its response):

========================================  ==============================================
record                                     seen in
========================================  ==============================================
``{"request": B, "response": R}``          hand-written logs, Portkey (``request.body``)
``{"messages": ..., "response": R}``       LiteLLM's standard logging payload
``{"body": B, "url": ..., "custom_id"}``   OpenAI Batch API input files
``{"params": B, "custom_id": ...}``        Anthropic Message Batches
``{"reqPayload": B, "respPayload": R}``    OpenPipe (payloads may be JSON strings)
``{"providerRequest": {"json": B}, ...}``  Helicone's async log
========================================  ==============================================

``session_id`` is read from the record, the body or ``metadata`` (another field name with
``--session-field``); a timestamp from ``timestamp``, ``created_at``, ``startTime``,
``requestedAt``, Helicone's ``timing`` (Unix seconds or milliseconds, or ISO 8601).

Records of ``python -m harness.proxy`` (``"recorded_by": "harness.proxy"``) whose call the
server never served (an HTTP error, an upstream that could not be reached, a body that is not
JSON) are skipped with a warning, not analysed: the engine never computed their prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.errors import UserError

OPENAI = "openai"
ANTHROPIC = "anthropic"

ANTHROPIC_BLOCKS = {"tool_use", "tool_result", "thinking", "redacted_thinking", "document", "tool_reference"}
OPENAI_PARTS = {"image_url", "input_audio", "file", "refusal", "video_url", "audio_url"}
OPENAI_ROLES = {"system", "developer", "tool", "function"}
# Fields that decide which tokens vLLM renders: the analysis applies them exactly as the server
# does (through vLLM's own request model), so none of them is ever dropped silently.
RENDER_FIELDS = (
    "tools",
    "tool_choice",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "documents",
    "reasoning_effort",
    "add_special_tokens",
    "truncate_prompt_tokens",
    "chat_template",
    "cache_salt",
)


@dataclass(frozen=True)
class LoggedUsage:
    """What the server or provider reported about the prompt, when the log has the response."""

    prompt_tokens: int | None  # all prompt tokens (Anthropic: input + cache read + cache write)
    cached_tokens: int | None  # served from cache (OpenAI cached_tokens; Anthropic cache_read)
    cache_write_tokens: int | None  # Anthropic cache_creation_input_tokens
    output_tokens: int | None


@dataclass(frozen=True)
class LoggedResponse:
    """The reply a request got: the assistant message it adds to the conversation."""

    message: dict[str, Any]  # in the request body's own format (OpenAI message / Anthropic message)
    finish_reason: str | None  # "stop", "length", "tool_calls"; Anthropic stop_reason mapped
    token_ids: list[int] | None  # the generated token IDs, when the server returned them
    usage: LoggedUsage | None


@dataclass(frozen=True)
class ChatRequest:
    """One request of the log: its body, where it came from, which session it is in."""

    line: int  # 1-based line number in the file
    body: dict[str, Any]  # the request body as sent
    format: str  # OPENAI | ANTHROPIC
    session_id: str | None  # None: the default session
    timestamp: float | None = None  # Unix seconds, when the record has one
    response: LoggedResponse | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body["messages"])


class NotServed(UserError):
    """A proxy record of a call the server did not serve: skipped, whatever ``--skip-bad`` says."""


def _not_served(record: dict[str, Any]) -> str | None:
    if record.get("recorded_by") != "harness.proxy":
        return None
    status = record.get("status")
    if not isinstance(status, int) or not 200 <= status < 300:
        return f"the call failed (HTTP {status}): the server did not serve it"
    if not isinstance(record.get("request"), dict):
        return "the request body is not a JSON object"
    return None


@dataclass(frozen=True)
class SkippedLine:
    line: int
    error: str


def _bad(line: int, problem: str) -> UserError:
    return UserError(f"line {line}: {problem}")


def _json_payload(value: Any) -> Any:
    """A payload that some tools store as a JSON string (OpenPipe's reqPayload)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _dig(record: dict[str, Any], *path: str) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, dict):
            return None
        value = _json_payload(value.get(key))
    return value


def unwrap(record: dict[str, Any]) -> tuple[dict[str, Any] | None, Any, str | None]:
    """(request body, response or None, URL hint) from a record of any supported shape."""
    if isinstance(record.get("messages"), list):
        return record, _json_payload(record.get("response")), None
    for path in (
        ("request", "body"),
        ("request", "json"),
        ("request",),
        ("body",),
        ("params",),
        ("reqPayload",),
        ("providerRequest", "json"),
    ):
        body = _dig(record, *path)
        if isinstance(body, dict) and "messages" in body:
            url = _dig(record, path[0], "url") if len(path) > 1 else record.get("url")
            response = None
            for rpath in (
                ("response", "body"),
                ("response", "json"),
                ("response",),
                ("respPayload",),
                ("providerResponse", "json"),
            ):
                candidate = _dig(record, *rpath)
                if isinstance(candidate, dict) and ("choices" in candidate or "content" in candidate):
                    response = candidate
                    break
            return body, response, url if isinstance(url, str) else None
    return None, None, None


def detect_format(body: dict[str, Any], url: str | None = None) -> str:
    """OPENAI or ANTHROPIC, from what only one of the two formats has (see the module doc)."""
    if url:
        if url.rstrip("/").endswith("/messages"):
            return ANTHROPIC
        if url.rstrip("/").endswith("/chat/completions"):
            return OPENAI
    if "system" in body or "cache_control" in body or "anthropic_version" in body:
        return ANTHROPIC
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and "input_schema" in tool:
            return ANTHROPIC
        if isinstance(tool, dict) and "function" in tool:
            return OPENAI
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        if message.get("role") in OPENAI_ROLES or "tool_calls" in message or "tool_call_id" in message:
            return OPENAI
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ANTHROPIC_BLOCKS or (kind == "image" and "source" in part):
                return ANTHROPIC
            if kind in OPENAI_PARTS:
                return OPENAI
    return OPENAI


def check_body(body: dict[str, Any], fmt: str, line: int) -> None:
    """The structural checks a server would fail the request on, done before anything slow."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad(line, 'no "messages" list')
    if not messages:
        raise _bad(line, '"messages" is empty')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(line, f"message {i} is not an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(line, f'message {i} has no "role" string')
        content = message.get("content")
        if content is None:
            if fmt == ANTHROPIC:
                raise _bad(line, f'message {i} ({role}) has no "content"')
            if not message.get("tool_calls") and role != "assistant":
                raise _bad(line, f'message {i} ({role}) has no "content" string or parts')
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _bad(
                        line,
                        f'message {i} ({role}) has no "content": part {j} is not an object with a "type"',
                    )
        elif not isinstance(content, str):
            raise _bad(line, f'message {i} ({role}) has no "content" string or parts')
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise _bad(line, '"tools" must be a list of objects')
    if fmt == ANTHROPIC:
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise _bad(line, '"system" must be a string or a list of text blocks')


def _session(record: dict[str, Any], body: dict[str, Any], field: str, line: int) -> str | None:
    for holder in (record, body, record.get("metadata"), body.get("metadata")):
        if isinstance(holder, dict) and holder.get(field) is not None:
            value = holder[field]
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise _bad(line, f'"{field}" must be a string or an integer')
            return str(value)
    return None


def parse_timestamp(value: Any) -> float | None:
    """Unix seconds from seconds, milliseconds or an ISO 8601 string; None when unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(value) / 1000.0 if value > 1e11 else float(value)  # ms after 1973
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    if isinstance(value, dict) and "seconds" in value:  # Helicone's {"seconds", "milliseconds"}
        seconds = parse_timestamp(value.get("seconds"))
        return None if seconds is None else seconds + float(value.get("milliseconds") or 0) / 1000.0
    return None


def _timestamp(record: dict[str, Any]) -> float | None:
    for key in ("timestamp", "created_at", "startTime", "requestedAt", "start_time"):
        if key in record:
            return parse_timestamp(record[key])
    return parse_timestamp(_dig(record, "timing", "startTime"))


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_response(response: Any, fmt: str) -> LoggedResponse | None:
    """The assistant message and usage of a logged response; None for an error or no reply."""
    if not isinstance(response, dict):
        return None
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else None
    if isinstance(response.get("choices"), list) and response["choices"]:  # OpenAI chat.completion
        choice = response["choices"][0]
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            return None
        logged = None
        if usage is not None:
            details = usage.get("prompt_tokens_details")
            logged = LoggedUsage(
                _int(usage.get("prompt_tokens")),
                _int(details.get("cached_tokens")) if isinstance(details, dict) else None,
                None,
                _int(usage.get("completion_tokens")),
            )
        ids = choice.get("token_ids")
        return LoggedResponse(
            {k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "reasoning_content")}
            | {"role": "assistant"},
            choice.get("finish_reason"),
            [int(t) for t in ids] if isinstance(ids, list) else None,
            logged,
        )
    if isinstance(response.get("content"), list) and response.get("type", "message") == "message":
        logged = None
        if usage is not None:
            read, write = (
                _int(usage.get("cache_read_input_tokens")),
                _int(usage.get("cache_creation_input_tokens")),
            )
            fresh = _int(usage.get("input_tokens"))
            total = None if fresh is None else fresh + (read or 0) + (write or 0)
            logged = LoggedUsage(total, read, write, _int(usage.get("output_tokens")))
        stop = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
        return LoggedResponse(
            {"role": "assistant", "content": response["content"]},
            stop.get(str(response.get("stop_reason")), response.get("stop_reason")),
            None,
            logged,
        )
    return None


def parse_record(text: str, line: int, session_field: str = "session_id") -> ChatRequest:
    """Parse one JSONL line; raise ``UserError`` naming the line when it is not a chat request."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _bad(line, f"expected a JSON object, got {type(record).__name__}")
    not_served = _not_served(record)
    if not_served is not None:
        raise NotServed(f"line {line}: {not_served}")
    body, response, url = unwrap(record)
    if body is None:
        if "messages" in record:
            raise _bad(line, 'no "messages" list')
        if "prompt" in record or "input" in record:
            raise _bad(
                line,
                'no "messages" list: completions and Responses API bodies are not chat '
                "requests (expected OpenAI Chat Completions or Anthropic Messages)",
            )
        raise _bad(
            line,
            'no "messages" list (expected an OpenAI Chat Completions or an Anthropic '
            'Messages body, bare or wrapped as {"request": ..., "response": ...})',
        )
    fmt = detect_format(body, url)
    check_body(body, fmt, line)
    if isinstance(record.get("error"), dict) and record.get("response") is None:
        response = None
    return ChatRequest(
        line,
        body,
        fmt,
        _session(record, body, session_field, line),
        _timestamp(record),
        parse_response(response, fmt),
    )


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line; a file that cannot be read is one error."""
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                if raw.strip():
                    yield number, raw
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_requests(
    path: Path,
    skip_bad: bool = False,
    warn: Callable[[str], None] | None = None,
    session_field: str = "session_id",
) -> tuple[list[ChatRequest], list[SkippedLine]]:
    """Read a JSONL file of chat requests, in order. Blank lines are ignored.

    A malformed line raises ``UserError`` and nothing after it is read, unless ``skip_bad``:
    then it is reported through ``warn`` and skipped.
    """
    requests: list[ChatRequest] = []
    skipped: list[SkippedLine] = []
    for number, raw in iter_lines(path):
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(number, "not UTF-8 text") from None
            requests.append(parse_record(text, number, session_field))
        except NotServed as exc:
            skipped.append(SkippedLine(number, str(exc)))
            if warn is not None:
                warn(f"{path}: {exc} (skipped)")
        except UserError as exc:
            if not skip_bad:
                raise UserError(f"{path}: {exc}", exc.exit_code) from None
            skipped.append(SkippedLine(number, str(exc)))
            if warn is not None:
                warn(f"{path}: {exc} (skipped)")
    return requests, skipped
