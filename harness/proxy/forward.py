"""The HTTP passthrough: every request forwarded as it came, every response returned as it comes.

aiohttp serves the clients and is the client of the upstream (one connection pool, kept alive).
For each request:

* method, path, query string, headers and body go upstream unchanged, except what HTTP itself
  says belongs to one hop (``Connection``, ``Keep-Alive``, ``Transfer-Encoding``, ``TE``,
  ``Trailer``, ``Upgrade``, ``Proxy-*``, ``Expect``, and ``Host``, which names the upstream).
  The client's credentials (``Authorization``, ``x-api-key``, ``api-key``, ...) go with them:
  the upstream needs them; nothing else sees them. The proxy adds no header of its own (no
  ``User-Agent``, ``Accept-Encoding`` or ``Content-Type`` the client did not send), keeps no
  cookies, and follows no redirects (they go back to the client);
* the response's status, headers and body come back byte for byte (compressed bodies stay
  compressed), each piece written to the client as soon as it arrives: a server-sent-event
  stream is never held back or buffered whole;
* ``POST`` to a path ending in ``/chat/completions``, ``/responses`` or ``/messages`` is also
  *recorded*: the body is read whole first (it goes into the log), the response's bytes are kept
  as they pass, and the finished ``Call`` is handed to ``on_call`` (a queue put: the parsing,
  the log and the analysis happen elsewhere). Any other path is streamed through unrecorded.

When things go wrong the proxy stays up and says so in one JSON line naming the upstream:

* the upstream refuses the connection or fails before answering: ``502``;
* it does not connect within ``connect_timeout_s`` or answer within ``read_timeout_s``
  (``--timeout``; also the longest silence allowed inside a stream): ``504``;
* it answers with an error: its own status and body, untouched;
* it cuts a stream short, or falls silent mid-stream: the client's connection is closed without
  the stream's end, as the upstream's would have been, and the record says ``incomplete``;
* the client goes away: the upstream call is cancelled at once (its connection closed, which
  vLLM takes as an abort), and the record says ``incomplete``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from harness.errors import UserError
from harness.proxy.record import RECORDED_HEADERS, Call, dumps, loads, redact_url
from harness.proxy.sessions import DEFAULT_HEADER
from harness.proxy.streams import CHAT, api_of

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",  # set again from the body actually sent
        "expect",  # 100-continue was the client's exchange with the proxy, already answered
    }
)
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 600.0  # a cold prefill of a long prompt on a CPU takes minutes


@dataclass(frozen=True)
class ProxySettings:
    upstream: str  # the upstream's root URL (what comes before /v1), no trailing slash
    host: str = "127.0.0.1"
    port: int = 8800
    session_header: str = DEFAULT_HEADER
    add_stream_usage: bool = False
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


def forwarded_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The headers that go on to the next hop (see the module docstring)."""
    named = {
        token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            out.add(name, value)
    return out


def with_stream_usage(body: bytes) -> bytes | None:
    """``--add-stream-usage``: the body of a streamed Chat Completions call that does not ask for
    usage, asking for it; None when there is nothing to change."""
    try:
        data = loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("stream") is not True:
        return None
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return None
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return dumps(data)


def error_body(status: int, kind: str, message: str) -> bytes:
    """One JSON line both SDKs read as an API error (``error.message``)."""
    payload = {"type": "error", "error": {"type": kind, "message": message, "code": status}}
    return dumps(payload) + b"\n"


class _Answered(Exception):
    """The proxy answered the client itself (502/504) before the upstream did."""

    def __init__(self, response: web.Response, status: int, error: str) -> None:
        self.response, self.status, self.error = response, status, error


class Proxy:
    """The server: ``await start()``, ``await stop()``; ``on_call`` gets every recorded call."""

    def __init__(self, settings: ProxySettings, on_call: Callable[[Call], None]) -> None:
        self.settings = settings
        self.on_call = on_call
        self.upstream_name = redact_url(settings.upstream)
        self._root = settings.upstream.rstrip("/")
        self._seq = itertools.count()
        self._stopping = False
        self._client: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None
        self.port = settings.port
        self.calls = 0  # recorded calls so far
        self.passed = 0  # other requests forwarded

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; a port that cannot be bound is a ``UserError``."""
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.settings.connect_timeout_s, sock_read=self.settings.read_timeout_s
        )
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=timeout,
            auto_decompress=False,  # bytes pass through as the upstream encoded them
            cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies are never another's
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        server = web.Server(self.handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self._close()
            where = f"{self.settings.host}:{self.settings.port}"
            if exc.errno == 98 or "in use" in str(exc).lower():
                raise UserError(
                    f"cannot listen on {where}: the port is in use (choose another with --port)"
                ) from None
            raise UserError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        sockets = getattr(site._server, "sockets", None) or []  # the port chosen for --port 0
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening; calls in flight are cancelled (recorded as incomplete)."""
        self._stopping = True
        await self._close()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------------ one request

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        start = time.perf_counter()
        api = api_of(request.path) if request.method == "POST" else None
        headers = forwarded_headers(request.headers)
        url = URL(self._root + request.raw_path, encoded=True)
        if api is None:
            self.passed += 1
            data: Any = None
            if request.body_exists:
                data = request.content
                length = request.headers.get("Content-Length")
                if length is not None:
                    headers["Content-Length"] = length  # so it is not sent chunked
            return await self._forward(request, url, headers, data, None, start)

        body = await request.content.read()  # the whole body: it goes into the log
        sent = body
        call = Call(
            seq=next(self._seq),
            api=api,
            started=time.time(),
            url=redact_url(str(url)),
            query=request.rel_url.raw_query_string,
            headers={h: request.headers[h] for h in RECORDED_HEADERS if h in request.headers},
            session_header=request.headers.get(self.settings.session_header),
            body=body,
        )
        if self.settings.session_header.lower() not in RECORDED_HEADERS and call.session_header:
            call.headers[self.settings.session_header] = call.session_header
        self.calls += 1
        if self.settings.add_stream_usage and api == CHAT:
            changed = with_stream_usage(body)
            if changed is not None:
                sent, call.stream_usage_added = changed, True
        try:
            return await self._forward(request, url, headers, sent, call, start)
        finally:
            call.duration_ms = (time.perf_counter() - start) * 1000.0
            self.on_call(call)

    async def _forward(
        self,
        request: web.BaseRequest,
        url: URL,
        headers: CIMultiDict[str],
        data: Any,
        call: Call | None,
        start: float,
    ) -> web.StreamResponse:
        """Send upstream, stream the answer back as it comes."""
        assert self._client is not None
        try:
            upstream = await self._send(request.method, url, headers, data)
        except _Answered as answered:
            if call is not None:
                call.status, call.error = answered.status, answered.error
                call.content_type = "application/json"
                call.chunks.append(answered.response.body)  # type: ignore[arg-type]
                call.ttfb_ms = (time.perf_counter() - start) * 1000.0
            return answered.response
        except asyncio.CancelledError:
            if call is not None:
                call.incomplete = True
                call.error = self._gone("before the upstream answered")
            raise
        if call is not None:
            call.status = upstream.status
            call.content_type = upstream.headers.get("Content-Type", "")
            call.content_encoding = upstream.headers.get("Content-Encoding", "")
        finished = False
        try:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=forwarded_response_headers(upstream)
            )
            await response.prepare(request)
            content = upstream.content
            first = True
            while True:
                try:
                    chunk = await content.readany()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self._cut(request, call, self._upstream_failure(exc))
                    return response
                if not chunk:
                    break
                await response.write(chunk)
                if call is not None:
                    call.chunks.append(chunk)  # after the write: the record has what the client got
                if first and call is not None:
                    call.ttfb_ms = (time.perf_counter() - start) * 1000.0
                first = False
            await response.write_eof()
            if call is not None and call.ttfb_ms is None:
                call.ttfb_ms = (time.perf_counter() - start) * 1000.0
            finished = True
            return response
        except asyncio.CancelledError:
            if call is not None:
                call.incomplete = True
                call.error = self._gone("mid-response")
            raise
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            if call is not None:
                call.incomplete = True
                call.error = self._gone("mid-response")
            raise asyncio.CancelledError from None
        finally:
            if finished:
                upstream.release()
            else:
                upstream.close()  # the upstream sees the connection drop: vLLM aborts the request

    async def _send(
        self, method: str, url: URL, headers: CIMultiDict[str], data: Any
    ) -> aiohttp.ClientResponse:
        assert self._client is not None
        try:
            return await self._client.request(method, url, headers=headers, data=data, allow_redirects=False)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise self._answer(504, "upstream_timeout", self._upstream_failure(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._answer(502, "upstream_unreachable", self._upstream_failure(exc)) from None

    def _answer(self, status: int, kind: str, message: str) -> _Answered:
        body = error_body(status, kind, f"harness.proxy: {message}")
        response = web.Response(status=status, body=body, content_type="application/json")
        return _Answered(response, status, message)

    def _upstream_failure(self, exc: BaseException) -> str:
        name = self.upstream_name
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"upstream {name} did not accept a connection within {self.settings.connect_timeout_s:g} s"
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return f"upstream {name} sent nothing for {self.settings.read_timeout_s:g} s (--timeout)"
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = exc.os_error.strerror or str(exc.os_error)
            return f"cannot reach upstream {name}: {reason}"
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return f"upstream {name} closed the connection"
        if isinstance(exc, aiohttp.ClientPayloadError):
            return f"upstream {name} cut the response short"
        return f"upstream {name} failed: {type(exc).__name__}: {exc}"

    def _gone(self, when: str) -> str:
        return "the proxy was stopped " + when if self._stopping else "the client went away " + when

    @staticmethod
    def _cut(request: web.BaseRequest, call: Call | None, reason: str) -> None:
        """End the client's connection without the stream's end: it sees the cut the upstream made."""
        if call is not None:
            call.incomplete, call.error = True, reason
        transport = request.transport
        if transport is not None:
            transport.close()


def forwarded_response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    headers = forwarded_headers(upstream.headers)
    length = upstream.headers.get("Content-Length")
    if length is not None:
        headers["Content-Length"] = length  # the same bytes go back: their length stands
    return headers
