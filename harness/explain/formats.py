"""Reading a request log: one JSON record per line, in the order the requests were sent.

A record is a request body, or a body wrapped with its response the way gateways and tracing
tools write them. Every line is checked here, cheaply and before anything slow starts, so a
malformed line stops the run with one ``line N: ...`` error (or is skipped with ``--skip-bad``).

Request bodies:

* **OpenAI Chat Completions** (``{"messages": [...], "tools": [...], ...}``): string content or
  content parts, ``tool_calls`` with ``"content": null``, ``tool`` messages with
  ``tool_call_id``, ``name``, ``developer`` messages.
* **OpenAI Responses** (``{"instructions": ..., "input": "..." | [items], "tools": [...],
  "previous_response_id": ...}``, what OpenAI's Agents SDK and Codex-style CLIs send): ``input``
  items ``message`` (``input_text``/``output_text`` parts, or a string), ``function_call``,
  ``function_call_output``, ``reasoning``, ``custom_tool_call``; flat function tools
  (``{"type": "function", "name", "parameters"}``); ``tool_choice``. ``previous_response_id``
  is resolved the way vLLM's ``/v1/responses`` resolves it: the earlier record of this log whose
  response has that ``id`` supplies its request's messages and that response's output items
  (``render`` does the rest through vLLM's own code). The request inherits that record's session
  when it names none of its own.
* **Anthropic Messages** (``{"system": ..., "messages": [...], "max_tokens": N, ...}``): system
  as a string or text blocks, content blocks ``text``, ``image``, ``tool_use``,
  ``tool_result``, ``thinking``, ``tools`` with ``input_schema``, ``cache_control``.

A body without ``messages`` but with ``input`` is a Responses body (so is any body wrapped with
a URL ending in ``/responses``). A ``messages`` body is Anthropic when something only Anthropic
has is there (a top-level ``system`` or ``cache_control``, a ``tool_use``/``tool_result`` block,
a tool with ``input_schema``, a wrapper URL ending in ``/v1/messages``), OpenAI when something
only OpenAI has is there (``system``, ``developer`` or ``tool`` roles, ``tool_calls``,
``image_url`` parts, a tool with ``function``); plain user/assistant text renders the same
either way and is read as OpenAI.

Responses (when the record has one): Chat Completions ``choices[0].message`` with
``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens``; Anthropic ``content``
blocks with ``usage.input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``;
Responses (``"object": "response"``) ``output`` items with ``usage.input_tokens``,
``usage.input_tokens_details.cached_tokens`` (and ``cache_write_tokens`` where reported).

Wrappers (the request and, when there, its response). *Recorded* means a fixture written by the
real tool is read in the tests; *documentation* means the shape was built from the tool's
documentation only, without a real export to check it against:

==========================================  ======================================  ===============
record                                       seen in                                 built from
==========================================  ======================================  ===============
``{"request": B, "response": R}``            hand-written logs, proxies               recorded
``{"messages", "model_parameters",           LiteLLM's standard logging payload       recorded
"response", "trace_id", ...}``               (``standard_logging_object``)            (litellm 1.110.2)
``{"body": B, "url": ..., "custom_id"}``     OpenAI Batch API input files             documentation
``{"params": B, "custom_id": ...}``          Anthropic Message Batches                documentation
``{"request": {"body": B}, "response"}``     Portkey                                  documentation
``{"reqPayload": B, "respPayload": R}``      OpenPipe (payloads may be JSON strings)  documentation
``{"providerRequest": {"json": B}, ...}``    Helicone's async log                     documentation
==========================================  ======================================  ===============

LiteLLM keeps only ``messages`` at the top of its payload: ``tools``, ``tool_choice`` and every
other request parameter are in ``model_parameters`` (merged back into the body here; an
``extra_body`` there is merged as the OpenAI SDK sends it), and the session in ``trace_id``
(from ``litellm_session_id``, ``litellm_trace_id`` or ``metadata["session_id"]``): its own
``session_id`` is empty unless ``litellm.request_correlation_in_logs`` is on. A call made
without any of them gets a fresh ``trace_id``, i.e. a session of its own.

The session is read from ``session_id`` in the record, the body or ``metadata`` (another field
name with ``--session-field``), a string or a number (an empty string is no session), then from
LiteLLM's ``trace_id``; a timestamp from ``timestamp``, ``created_at``, ``startTime``,
``requestedAt``, Helicone's ``timing`` (Unix seconds or milliseconds, or ISO 8601).

Records of ``python -m harness.proxy`` (``"recorded_by": "harness.proxy"``) whose call the
server never served (an HTTP error, an upstream that could not be reached, a body that is not
JSON) are skipped with a warning, not analysed: the engine never computed their prompts.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from harness.errors import UserError
from harness.explain.diagnostics import ProviderDiagnostics, read_diagnostics

OPENAI = "openai"
ANTHROPIC = "anthropic"
RESPONSES = "responses"  # OpenAI's Responses API (/v1/responses)
FORMATS = (OPENAI, ANTHROPIC, RESPONSES)

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
    cache_write_tokens: int | None  # Anthropic cache_creation_input_tokens; Responses cache_write_tokens
    output_tokens: int | None


@dataclass(frozen=True)
class LoggedResponse:
    """The reply a request got: the assistant message it adds to the conversation."""

    message: dict[str, Any]  # OpenAI message / Anthropic message; Responses: the output's text
    finish_reason: str | None  # "stop", "length", "tool_calls"; Anthropic stop_reason mapped
    token_ids: list[int] | None  # the generated token IDs, when the server returned them
    usage: LoggedUsage | None
    # Its id, model and URL, and the provider's own cache-miss diagnosis when it has one
    # (harness/explain/diagnostics.py): filled by parse_record from the raw response, any format.
    diagnostics: ProviderDiagnostics | None = None
    response_id: str | None = None  # Responses: the id a later previous_response_id names
    output: list[dict[str, Any]] | None = None  # Responses: the output items as logged


@dataclass(frozen=True)
class ChatRequest:
    """One request of the log: its body, where it came from, which session it is in."""

    line: int  # 1-based line number in the file
    body: dict[str, Any]  # the request body as sent
    format: str  # OPENAI | ANTHROPIC | RESPONSES
    session_id: str | None  # None: the default session
    timestamp: float | None = None  # Unix seconds, when the record has one
    response: LoggedResponse | None = None
    # Responses: the earlier request whose response ``previous_response_id`` continues
    previous: ChatRequest | None = field(default=None, repr=False, compare=False)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (a Responses request: ``responses_messages``)."""
        return responses_messages(self) if self.format == RESPONSES else list(self.body["messages"])


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


def is_responses_body(body: dict[str, Any]) -> bool:
    """A Responses API body: ``input`` where a chat body has ``messages`` (a completions body
    has ``prompt`` instead; a Responses ``prompt`` is a template reference, an object)."""
    return (
        "messages" not in body
        and isinstance(body.get("input"), str | list)
        and not isinstance(body.get("prompt"), str | list)
    )


def _is_body(value: Any) -> bool:
    return isinstance(value, dict) and ("messages" in value or is_responses_body(value))


def litellm_body(record: dict[str, Any]) -> dict[str, Any]:
    """The request body a LiteLLM standard logging payload stands for: its ``messages`` and its
    ``model_parameters`` (``tools``, ``tool_choice``, ``temperature``, ...), with an
    ``extra_body`` merged the way the OpenAI SDK sends it (at the top level of the body)."""
    params = dict(record["model_parameters"])
    extra = params.pop("extra_body", None)
    body = dict(extra) if isinstance(extra, dict) else {}
    body.update(params)
    body["messages"] = record["messages"]
    return body


def _is_litellm(record: dict[str, Any]) -> bool:
    return isinstance(record.get("model_parameters"), dict) and isinstance(record.get("messages"), list)


def _is_response(value: Any) -> bool:
    return isinstance(value, dict) and (
        "choices" in value or "content" in value or value.get("object") == "response"
    )


def unwrap(record: dict[str, Any]) -> tuple[dict[str, Any] | None, Any, str | None]:
    """(request body, response or None, URL hint) from a record of any supported shape."""
    if _is_litellm(record):
        return litellm_body(record), _json_payload(record.get("response")), None
    if isinstance(record.get("messages"), list) or is_responses_body(record):
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
        if _is_body(body):
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
                if _is_response(candidate):
                    response = candidate
                    break
            return body, response, url if isinstance(url, str) else None
    return None, None, None


def detect_format(body: dict[str, Any], url: str | None = None) -> str:
    """OPENAI, ANTHROPIC or RESPONSES, from what only one format has (see the module doc)."""
    if url:
        if url.rstrip("/").endswith("/messages"):
            return ANTHROPIC
        if url.rstrip("/").endswith("/chat/completions"):
            return OPENAI
        if url.rstrip("/").endswith("/responses"):
            return RESPONSES
    if is_responses_body(body):
        return RESPONSES
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


# What each Responses input item needs before vLLM can turn it into a chat message: the string
# fields, then the one that may also be a list of parts. Other item types go to vLLM as they are
# (it refuses those it does not take, e.g. "item_reference", with its own message).
_ITEM_FIELDS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "message": (("role",), "content"),
    "function_call": (("call_id", "name", "arguments"), None),
    "function_call_output": (("call_id",), "output"),
    "custom_tool_call": (("call_id", "name", "input"), None),
    "custom_tool_call_output": (("call_id",), "output"),
}


def check_responses_body(body: dict[str, Any], line: int) -> None:
    """The structural checks of a Responses body (see ``check_body``)."""
    items = body.get("input")
    if not isinstance(items, str | list):
        raise _bad(line, '"input" must be a string or a list of items')
    for i, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict):
            raise _bad(line, f"input item {i} is not an object (Responses input items are objects)")
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str):
            raise _bad(line, f'input item {i} has no "type" (or "role")')
        strings, text_or_parts = _ITEM_FIELDS.get(kind, ((), None))
        for name in strings:
            if not isinstance(item.get(name), str):
                raise _bad(line, f'input item {i} ({kind}) has no "{name}" string')
        if text_or_parts is not None:
            value = item.get(text_or_parts)
            parts_ok = isinstance(value, list) and all(
                isinstance(p, dict) and isinstance(p.get("type"), str) for p in value
            )
            if not isinstance(value, str) and not parts_ok:
                raise _bad(line, f'input item {i} ({kind}) has no "{text_or_parts}" string or parts')
    for name in ("instructions", "previous_response_id"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise _bad(line, f'"{name}" must be a string')
    tools = body.get("tools")
    typed = isinstance(tools, list) and all(
        isinstance(t, dict) and isinstance(t.get("type"), str) for t in tools
    )
    if tools is not None and not typed:
        raise _bad(line, '"tools" must be a list of objects with a "type"')


def check_body(body: dict[str, Any], fmt: str, line: int) -> None:
    """The structural checks a server would fail the request on, done before anything slow."""
    if fmt == RESPONSES:
        check_responses_body(body, line)
        return
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
        if isinstance(holder, dict) and holder.get(field) not in (None, ""):
            value = holder[field]
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise _bad(line, f'"{field}" must be a string or an integer')
            return str(value)
    if field == "session_id" and _is_litellm(record) and isinstance(record.get("trace_id"), str | int):
        return str(record["trace_id"]) or None  # LiteLLM's session (see the module docstring)
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


def _responses_response(response: dict[str, Any], usage: dict[str, Any] | None) -> LoggedResponse | None:
    """A Responses API response object (``"object": "response"``)."""
    output = response.get("output")
    if response.get("status") not in (None, "completed", "incomplete") or not isinstance(output, list):
        return None  # failed, cancelled, or still running (background): no reply to cache
    items = [item for item in output if isinstance(item, dict)]
    logged = None
    if usage is not None:
        details = usage.get("input_tokens_details")
        details = details if isinstance(details, dict) else {}
        logged = LoggedUsage(
            _int(usage.get("input_tokens")),
            _int(details.get("cached_tokens")),
            _int(details.get("cache_write_tokens")),
            _int(usage.get("output_tokens")),
        )
    text = "".join(
        str(part.get("text", ""))
        for item in items
        if item.get("type") == "message"
        for part in item.get("content") or []
        if isinstance(part, dict) and part.get("type") == "output_text"
    )
    incomplete = response.get("incomplete_details")
    if isinstance(incomplete, dict) and incomplete.get("reason") == "max_output_tokens":
        finish = "length"
    elif any(item.get("type") in ("function_call", "custom_tool_call") for item in items):
        finish = "tool_calls"
    else:
        finish = "stop"
    response_id = response.get("id")
    return LoggedResponse(
        {"role": "assistant", "content": text},
        finish,
        None,
        logged,
        response_id=response_id if isinstance(response_id, str) else None,
        output=items,
    )


def parse_response(response: Any, fmt: str) -> LoggedResponse | None:
    """The assistant message and usage of a logged response; None for an error or no reply."""
    if not isinstance(response, dict):
        return None
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else None
    if response.get("object") == "response" or (fmt == RESPONSES and "output" in response):
        return _responses_response(response, usage)
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


def parse_record(
    text: str | bytes,
    line: int,
    session_field: str = "session_id",
    earlier: Mapping[str, ChatRequest] | None = None,
) -> ChatRequest:
    """Parse one JSONL line; raise ``UserError`` naming the line when it is not a chat request.

    ``earlier``: the requests of the log before this line, by the ``id`` of their logged
    response; a Responses body's ``previous_response_id`` must be one of them (``RecordReader``
    keeps it)."""
    try:
        record = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:  # the standard library's message says where, in words people know
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except UnicodeDecodeError:
            raise _bad(line, "not UTF-8 text") from None
    if not isinstance(record, dict):
        raise _bad(line, f"expected a JSON object, got {type(record).__name__}")
    not_served = _not_served(record)
    if not_served is not None:
        raise NotServed(f"line {line}: {not_served}")
    body, response, url = unwrap(record)
    if body is None:
        if "messages" in record:
            raise _bad(line, 'no "messages" list')
        if "prompt" in record:
            raise _bad(
                line,
                'no "messages" list: a completions body ("prompt") is not a chat request '
                "(expected OpenAI Chat Completions, OpenAI Responses or Anthropic Messages)",
            )
        raise _bad(
            line,
            'no "messages" list (expected an OpenAI Chat Completions, OpenAI Responses or Anthropic '
            'Messages body, bare or wrapped as {"request": ..., "response": ...})',
        )
    fmt = detect_format(body, url)
    check_body(body, fmt, line)
    if isinstance(record.get("error"), dict) and record.get("response") is None:
        response = None
    parsed = parse_response(response, fmt)
    if parsed is not None:
        parsed = replace(parsed, diagnostics=read_diagnostics(response, url))
    session = _session(record, body, session_field, line)
    previous = None
    if fmt == RESPONSES and body.get("previous_response_id") is not None:
        previous = (earlier or {}).get(body["previous_response_id"])
        if previous is None:
            raise _bad(
                line,
                f'previous_response_id "{body["previous_response_id"]}" is not the response of an '
                "earlier line of this log (the server would answer 404): log the request that "
                "produced it with its response, before this line",
            )
        if session is None:
            session = previous.session_id  # a chain of responses is one conversation
    return ChatRequest(
        line,
        body,
        fmt,
        session,
        _timestamp(record),
        parsed,
        previous,
    )


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Responses body's ``input`` as items (a string is one user message)."""
    value = body.get("input")
    return [{"role": "user", "content": value}] if isinstance(value, str) else list(value or [])


_TEXT_PARTS = ("input_text", "output_text", "text")
_CLIENT_ITEMS = ("function_call_output", "custom_tool_call_output")  # what the client sends back


def _item_message(item: dict[str, Any]) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = [
                {"type": "text", "text": str(p.get("text", ""))} if p.get("type") in _TEXT_PARTS else p
                for p in content
                if isinstance(p, dict)
            ]
        return {"role": str(item.get("role", "user")), "content": content}
    block = {k: v for k, v in item.items() if k not in ("id", "status")}
    return {"role": "tool" if kind in _CLIENT_ITEMS else "assistant", "content": [block]}


def chain_items(request: ChatRequest) -> list[dict[str, Any]]:
    """The input items a hosted Responses API reads for this request, its chain written out.

    OpenAI's API reference (``POST /responses``,
    https://platform.openai.com/docs/api-reference/responses/create, read 2026-12-02 from a
    stored copy): a request with ``previous_response_id`` continues that response's whole
    conversation, and the earlier ``instructions`` are not carried over. So: every earlier
    request's input items and *all* its response's output items (reasoning and tool calls too;
    vLLM carries only the messages forward, see ``render``), then this ``input``.
    """
    chain: list[ChatRequest] = []
    earlier = request.previous
    while earlier is not None:
        chain.append(earlier)
        earlier = earlier.previous
    items: list[dict[str, Any]] = []
    for past in reversed(chain):
        items += input_items(past.body)
        if past.response is not None:
            items += past.response.output or []
    return items + input_items(request.body)


def responses_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """A Responses request's conversation as chat messages: its ``instructions`` (a system
    message), then ``chain_items``; text parts become text blocks, any other item one block of
    its own JSON."""
    instructions = request.body.get("instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    return system + [_item_message(item) for item in chain_items(request)]


class RecordReader:
    """Parses a log's records in order, keeping the responses a later Responses request may
    continue with ``previous_response_id`` (as the server's response store does).

    The ``KEEP`` most recently used ones: a chain continues from its latest response, so the
    chains still going are kept and an idle session's are let go (a long log's do not pile up).
    """

    KEEP = 10_000

    def __init__(self, session_field: str = "session_id") -> None:
        self.session_field = session_field
        self._responses: OrderedDict[str, ChatRequest] = OrderedDict()

    def parse(self, text: str | bytes, line: int) -> ChatRequest:
        request = parse_record(text, line, self.session_field, self._responses)
        if request.previous is not None and request.previous.response is not None:
            said = request.previous.response.response_id
            if said in self._responses:
                self._responses.move_to_end(said)
        if request.response is not None and request.response.response_id is not None:
            self._responses[request.response.response_id] = request
            self._responses.move_to_end(request.response.response_id)
            if len(self._responses) > self.KEEP:
                self._responses.popitem(last=False)
        return request


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


def iter_requests(
    path: Path,
    skip_bad: bool = False,
    warn: Callable[[str], None] | None = None,
    session_field: str = "session_id",
) -> Iterator[ChatRequest | SkippedLine]:
    """The chat requests of a JSONL file, in order, one at a time (the file is never held whole).
    Blank lines are ignored.

    A malformed line raises ``UserError`` and nothing after it is read, unless ``skip_bad``:
    then it is reported through ``warn`` and yielded as a ``SkippedLine``. (Responses requests
    whose response has an id are kept for a later ``previous_response_id``: ``RecordReader``.)
    """
    reader = RecordReader(session_field)
    for number, raw in iter_lines(path):
        try:
            yield reader.parse(raw, number)
        except NotServed as exc:
            if warn is not None:
                warn(f"{path}: {exc} (skipped)")
            yield SkippedLine(number, str(exc))
        except UserError as exc:
            if not skip_bad:
                raise UserError(f"{path}: {exc}", exc.exit_code) from None
            if warn is not None:
                warn(f"{path}: {exc} (skipped)")
            yield SkippedLine(number, str(exc))


def read_requests(
    path: Path,
    skip_bad: bool = False,
    warn: Callable[[str], None] | None = None,
    session_field: str = "session_id",
) -> tuple[list[ChatRequest], list[SkippedLine]]:
    """Read a JSONL file of chat requests, in order (``iter_requests``, kept in a list)."""
    requests: list[ChatRequest] = []
    skipped: list[SkippedLine] = []
    for item in iter_requests(path, skip_bad, warn, session_field):
        (skipped if isinstance(item, SkippedLine) else requests).append(item)  # type: ignore[arg-type]
    return requests, skipped
