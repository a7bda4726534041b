"""The log: one JSON line per recorded call, written in the order the calls were sent.

A record (docs/schemas/proxy-record.schema.json) is what ``python -m harness.explain`` reads::

    {"session_id": "run-7", "timestamp": "2026-12-02T10:15:02.114+00:00",
     "url": "http://127.0.0.1:8000/v1/chat/completions",
     "request": {...the body as the client sent it...},
     "response": {...the body as the client got it; a stream put back together...},
     "status": 200, "stream": true, "session_source": "header X-Session-Id",
     "ttfb_ms": 212.4, "duration_ms": 980.1, "recorded_by": "harness.proxy"}

plus, only when they apply: ``"incomplete": true`` (the client went away, the upstream cut the
stream or timed out, the proxy was stopped), ``"error"`` (what happened, in words), ``"notes"``
(e.g. a stream that carried no usage), ``"query"`` (the URL's query string, credentials
redacted), ``"headers"`` (the few request headers that change what a provider does:
``anthropic-version``, ``anthropic-beta``, ``openai-beta``, ``openai-organization``,
``openai-project``, ``content-type``, ``user-agent``, and the session header). No other header
is ever written: not ``Authorization``, ``x-api-key``, ``api-key``, cookies, or any other
credential, whatever its name.

**Order sent.** Calls are numbered when the proxy starts forwarding them upstream (the whole
request received), which is the order the upstream receives them, and their records are written
in that order: a call that ends early waits until every call sent before it is written. So the
log is in the order the engine saw the requests even when 64 agents stream at once, and a
stream that runs for minutes holds back the lines (not the traffic) behind it.

**The file.** Created readable and writable by its owner only (0600: it holds prompts). A log
that exists is never overwritten: the proxy refuses to start unless ``--append`` says to add to
it. Each record is one ``write`` of a whole line; a write that fails (a full disk) is undone
(the file cut back to its last whole line), reported once, and the proxy carries on: traffic is
never held up by the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.errors import UserError, first_line
from harness.proxy.sessions import SessionResolver
from harness.proxy.streams import CHAT, reassemble

RECORDED_BY = "harness.proxy"
# Request headers worth keeping: they change what a provider does with the body. Nothing else.
RECORDED_HEADERS = (
    "content-type",
    "user-agent",
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "openai-organization",
    "openai-project",
)
# Query parameters whose values are replaced: API keys travel there on some APIs (?key=...).
SECRET_PARAM_PARTS = ("key", "token", "secret", "sig", "auth", "password", "credential", "code")
REDACTED = "REDACTED"
TEXT_KEPT = 65_536  # characters of a body that is not JSON kept in the record
RECORDER_NICE = 10


@dataclass
class Call:
    """One recorded API call as it went through the proxy: raw bytes, filled in by ``forward``."""

    seq: int  # the order sent (see the module docstring)
    api: str  # CHAT | RESPONSES | MESSAGES
    started: float  # Unix time when the proxy received it
    url: str  # the upstream URL it went to, without the query string
    query: str  # the raw query string ("" when none)
    headers: dict[str, str]  # the request headers of RECORDED_HEADERS that it had
    session_header: str | None  # the value of the session header, when sent
    body: bytes  # the request body as the client sent it
    stream_usage_added: bool = False  # --add-stream-usage changed the body sent upstream
    status: int | None = None  # what the client got (502/504 when the proxy answered itself)
    content_type: str = ""
    content_encoding: str = ""
    chunks: list[bytes] = field(default_factory=list)  # the response body as the client got it
    incomplete: bool = False
    error: str | None = None
    ttfb_ms: float | None = None  # from receiving the request to sending the first byte back
    duration_ms: float | None = None


# --------------------------------------------------------------------------- JSON


def loads(data: bytes | str) -> Any:
    import orjson

    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # integers past 64 bits (orjson refuses them), or raises


def dumps(document: Any) -> bytes:
    import orjson

    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- one record


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def redact_query(query: str) -> str:
    """The query string with the values of credential-like parameters replaced."""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    kept = [
        (name, REDACTED if any(part in name.lower() for part in SECRET_PARAM_PARTS) else value)
        for name, value in pairs
    ]
    return urllib.parse.urlencode(kept, safe="/:,")


def redact_url(url: str) -> str:
    """A URL without user:password and without its query (for the console and the log)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def decode_body(data: bytes, encoding: str) -> bytes | None:
    """The body without its Content-Encoding (gzip, deflate); None for one Python cannot read."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    for wbits in (47, -15):  # gzip or zlib (auto-detected), then raw deflate
        try:
            inflate = zlib.decompressobj(wbits=wbits)
            return inflate.decompress(data) + inflate.flush()  # a cut stream: what it holds
        except zlib.error:
            continue
    return None


def _text(data: bytes) -> str:
    return data[:TEXT_KEPT].decode("utf-8", errors="replace")


def _wants_usage(request: Any) -> bool:
    options = request.get("stream_options") if isinstance(request, dict) else None
    return isinstance(options, dict) and bool(options.get("include_usage"))


def build_record(call: Call, sessions: SessionResolver) -> dict[str, Any]:
    """The log record of one call (see the module docstring)."""
    notes: list[str] = []
    record: dict[str, Any] = {}
    try:
        request = loads(call.body)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        what = "not JSON" if request is None else f"JSON but not an object ({type(request).__name__})"
        notes.append(f"the request body is {what} ({len(call.body)} bytes): forwarded as it was")
        record["request_text"] = _text(call.body)
    session = sessions.resolve(call.session_header, request)

    response: Any = None
    raw = b"".join(call.chunks)
    decoded = decode_body(raw, call.content_encoding)
    stream = "text/event-stream" in call.content_type.lower()
    incomplete, error = call.incomplete, call.error
    if decoded is None:
        notes.append(f"the response is encoded with {call.content_encoding!r}: not recorded")
    elif stream:
        assembled = reassemble(call.api, decoded)
        response = assembled.body
        notes += assembled.notes
        if assembled.error is not None:
            record["stream_error"] = assembled.error
        if not assembled.complete:
            incomplete = True
        elif incomplete and error and error.startswith("the client went away"):
            # It had the stream's end marker: SDKs close the connection right after it, before
            # the HTTP body's own end arrives. The client got everything.
            incomplete, error = False, None
        finished = assembled.complete and not call.incomplete  # a cut stream never got to its usage
        if finished and call.api == CHAT and isinstance(response, dict) and response.get("usage") is None:
            notes.append(
                "the stream carried no usage: the request did not set stream_options.include_usage "
                "(--add-stream-usage asks for it)"
                if not _wants_usage(request)
                else "the stream carried no usage"
            )
    elif decoded:
        try:
            response = loads(decoded)
        except ValueError:
            record["response_text"] = _text(decoded)
            if "json" in call.content_type.lower():
                incomplete = True  # JSON cut short
    if call.stream_usage_added:
        notes.append(
            "stream_options.include_usage was added by the proxy (--add-stream-usage): the client "
            "also got the usage chunk"
        )
    sessions.remember(response, session)

    head: dict[str, Any] = {
        "session_id": session.id,
        "timestamp": timestamp(call.started),
        "url": call.url,
        "request": request if isinstance(request, dict) else None,
        "response": response,
        "status": call.status,
        "stream": stream,
    }
    if incomplete:
        head["incomplete"] = True
    if error:
        head["error"] = error
    if notes:
        head["notes"] = notes
    head["session_source"] = session.source
    if call.query:
        head["query"] = redact_query(call.query)
    if call.headers:
        head["headers"] = dict(call.headers)
    head["ttfb_ms"] = None if call.ttfb_ms is None else round(call.ttfb_ms, 3)
    head["duration_ms"] = None if call.duration_ms is None else round(call.duration_ms, 3)
    head["recorded_by"] = RECORDED_BY
    head.update(record)
    return head


def fallback_record(call: Call, problem: str) -> dict[str, Any]:
    """The record of a call whose full record could not be built: its facts, and why."""
    return {
        "session_id": None,
        "timestamp": timestamp(call.started),
        "url": call.url,
        "request": None,
        "response": None,
        "status": call.status,
        "stream": False,
        "incomplete": True,
        "error": f"the proxy could not record this call: {problem}",
        "recorded_by": RECORDED_BY,
    }


# --------------------------------------------------------------------------- the file


def count_lines(path: Path) -> tuple[int, bool]:
    """(lines in the file, whether it ends in the middle of one)."""
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines, last != b"\n"


def check_log_target(path: Path, append: bool) -> int:
    """Fail before starting when the log cannot be written or would be overwritten; the number of
    lines already in it (with ``--append``)."""
    from harness.outputs import writable_target

    writable_target("--log", path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    if not append:
        raise UserError(
            f"--log {path} exists: pass --append to add to it, or choose another name "
            "(the proxy never overwrites a log)"
        )
    lines, partial = count_lines(path)
    return lines + int(partial)


class LogFile:
    """The log on disk: appended to line by line, each line whole or not at all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        existed = path.exists()
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise UserError(f"--log {path} cannot be written: {exc.strerror or exc}") from None
        self.lines = 0
        if existed and path.stat().st_size:
            self.lines, partial = count_lines(path)
            if partial:  # a last line without its end: finish it, so ours start on a line
                os.write(self._fd, b"\n")
                self.lines += 1
        self.created = not existed
        self.mode = path.stat().st_mode & 0o777
        self.start_offset = os.fstat(self._fd).st_size  # where this run's records begin
        self.start_lines = self.lines

    def write(self, line: bytes) -> None:
        """Append one line; on failure the file is cut back to where it was and OSError raised."""
        size = os.fstat(self._fd).st_size
        try:
            done = os.write(self._fd, line)
            if done != len(line):
                raise OSError(f"only {done} of {len(line)} bytes written")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise
        self.lines += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


# --------------------------------------------------------------------------- in order, off the loop


_STOP = object()


class Recorder:
    """Turns calls into records and writes them in the order sent, in its own thread.

    The request path only hands a finished ``Call`` over (``submit``, a queue put); parsing,
    reassembling streams and writing happen here; ``warn`` gets each kind of failure once. The
    live analysis reads the records from the log itself, as it grows: nothing more is asked of
    the proxy's process for it.
    """

    def __init__(self, log: LogFile, sessions: SessionResolver, warn: Callable[[str], None]) -> None:
        self.log = log
        self.sessions = sessions
        self.warn = warn
        self.recorded = 0
        self.lost = 0  # records the log could not take (full disk, ...)
        self.incomplete = 0
        self._warned: set[str] = set()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="proxy-recorder", daemon=True)
        self._thread.start()

    def submit(self, call: Call) -> None:
        self._queue.put(call)

    def close(self) -> None:
        """Write everything submitted, then stop."""
        self._queue.put(_STOP)
        self._thread.join()
        self.log.close()

    def _once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self.warn(message)

    def _run(self) -> None:
        # Below the event loop's thread in the OS's eyes (Linux: a thread has its own nice value).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RECORDER_NICE)
        pending: dict[int, Call] = {}
        next_seq = 0
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            pending[item.seq] = item
            while next_seq in pending:
                self._record(pending.pop(next_seq))
                next_seq += 1
                time.sleep(0)  # hand the GIL to the event loop if it waits: a burst never holds it
        for seq in sorted(pending):  # only after a call whose record never came (a bug): keep the rest
            self._record(pending.pop(seq))

    def _record(self, call: Call) -> None:
        try:
            record = build_record(call, self.sessions)
        except Exception as exc:  # fail open: the call is logged with what is known
            self._once("build", f"could not record a call fully ({first_line(exc)}); recorded what is known")
            record = fallback_record(call, first_line(exc))
        self.incomplete += bool(record.get("incomplete"))
        try:
            self.log.write(dumps(record) + b"\n")
            self.recorded += 1
        except OSError as exc:
            self.lost += 1
            self._once(
                "write",
                f"cannot write to {self.log.path}: {exc.strerror or exc}; traffic goes on, and records "
                "are lost (and not analysed) until the log can be written again",
            )
