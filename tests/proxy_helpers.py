"""A fake upstream and an in-process proxy for the proxy's tests of what needs no model: failures,
edge cases, transparency. Each runs an aiohttp event loop in its own thread.

The fake upstream (``FakeUpstream``) answers:

* ``/v1/chat/completions``: a short chat completion (``received`` has what it got), or for
  ``"stream": true`` a Chat Completions stream with a tool call split over several deltas, in
  vLLM's shapes (usage when ``stream_options.include_usage``);
* ``/v1/messages`` (``"stream": true``): an Anthropic stream with a text block and a tool_use whose
  input arrives in ``input_json_delta`` pieces;
* ``/v1/responses`` (``"stream": true``): a Responses API stream ending in ``response.completed``;
* paths starting with ``/gate``: one SSE event, then waits until the test opens the gate, then a
  second one; ``/slow``: nothing for a minute; ``/cut``: two events, then the connection is
  dropped; ``/endless``: an event every 50 ms until the client goes (``gone`` is set when it
  notices); ``/linger``: a whole chat stream, ``[DONE]`` included, then a second before the body
  ends. ``/cut/v1/chat/completions`` is such a path and a recorded API call at once;
* anything else: the exchange it received, as JSON (method, path, query, headers, body in base64).

Every request it receives is appended to ``received`` (arrival order).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from harness.proxy.forward import Proxy, ProxySettings
from harness.proxy.record import LogFile, Recorder
from harness.proxy.sessions import SessionResolver

SPECIAL = ("/gate", "/cut", "/endless", "/linger")
COMPLETION = {
    "id": "chatcmpl-fake0",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 1,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
}


class LoopThread:
    """An asyncio loop running in a daemon thread; ``call(coro)`` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()


def chat_chunks(model: str, include_usage: bool) -> list[bytes]:
    """A Chat Completions stream as vLLM sends it: text, then a tool call in pieces."""
    base = {"id": "chatcmpl-fake1", "object": "chat.completion.chunk", "created": 1796188846, "model": model}
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"content": "Let me "},
        {"content": "look."},
        {
            "content": None,
            "tool_calls": [
                {"id": "call_7", "type": "function", "index": 0, "function": {"name": "read_file"}}
            ],
        },
        {"content": None, "tool_calls": [{"index": 0, "function": {"arguments": '{"pa'}}]},
        {"content": None, "tool_calls": [{"index": 0, "function": {"arguments": 'th": "money.py"}'}}]},
    ]
    out = [
        sse(base | {"choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]})
        for d in deltas
    ]
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls", "stop_reason": None}
    out.append(sse(base | {"choices": [last], "system_fingerprint": "fake-1"}))
    if include_usage:
        usage = {
            "prompt_tokens": 90,
            "completion_tokens": 12,
            "total_tokens": 102,
            "prompt_tokens_details": {"cached_tokens": 64},
        }
        out.append(sse(base | {"choices": [], "usage": usage}))
    out.append(sse("[DONE]"))
    return out


def anthropic_events(model: str) -> list[bytes]:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_fake1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 120, "output_tokens": 0},
        },
    }
    events = [
        ("message_start", start),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Reading "}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "it."}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"path": "mon'},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": 'ey.py"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {
                    "input_tokens": 24,
                    "output_tokens": 15,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 96,
                },
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [sse(data, event) for event, data in events]


def responses_events(model: str) -> list[bytes]:
    response = {
        "id": "resp_fake1",
        "object": "response",
        "created_at": 1796188846,
        "model": model,
        "status": "in_progress",
        "output": [],
        "usage": None,
    }
    item = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Done.", "annotations": []}],
    }
    final = response | {
        "status": "completed",
        "output": [item],
        "usage": {
            "input_tokens": 80,
            "input_tokens_details": {"cached_tokens": 64},
            "output_tokens": 2,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 82,
        },
    }
    events = [
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": response}),
        (
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "sequence_number": 1,
                "output_index": 0,
                "item": item | {"status": "in_progress", "content": []},
            },
        ),
        (
            "response.content_part.added",
            {
                "type": "response.content_part.added",
                "sequence_number": 2,
                "output_index": 0,
                "content_index": 0,
                "item_id": "msg_1",
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ),
        (
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "sequence_number": 2,
                "output_index": 0,
                "content_index": 0,
                "item_id": "msg_1",
                "delta": "Done.",
                "logprobs": [],
            },
        ),
        (
            "response.output_item.done",
            {"type": "response.output_item.done", "sequence_number": 3, "output_index": 0, "item": item},
        ),
        ("response.completed", {"type": "response.completed", "sequence_number": 4, "response": final}),
    ]
    return [sse(data, event) for event, data in events]


class FakeUpstream:
    """See the module docstring. ``url`` once started; ``gate`` and ``gone`` are thread-safe events."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.gone = threading.Event()
        self.arrived = threading.Condition()
        self.delays: dict[str, float] = {}  # a body's "tag" -> seconds before answering
        self._loop = LoopThread()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeUpstream:
        self._loop.call(self._start())
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def close(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self._loop.call(self._runner.cleanup())
        self._loop.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        exchange = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": base64.b64encode(body).decode(),
        }
        with self.arrived:
            self.received.append(exchange)
            self.arrived.notify_all()
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        delay = self.delays.get(str(data.get("tag")))
        if delay:
            await asyncio.sleep(delay)
        path = request.path
        if path.startswith("/slow"):
            await asyncio.sleep(60)
        if path.startswith(SPECIAL) or data.get("stream"):
            return await self.stream(request, path, data)
        if path.endswith(("/chat/completions", "/messages", "/responses")):
            return web.json_response(COMPLETION)
        return web.json_response(exchange)

    async def stream(self, request: web.Request, path: str, data: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        model = str(data.get("model", "fake"))
        if path.startswith("/gate"):
            await response.write(sse({"n": 1}))
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            await response.write(sse({"n": 2}))
        elif path.startswith("/cut"):
            await response.write(sse({"n": 1}) + sse({"n": 2}))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response
        elif path.startswith("/endless"):
            try:
                n = 0
                while True:
                    n += 1
                    await response.write(sse({"n": n}))
                    await asyncio.sleep(0.05)
            except (asyncio.CancelledError, ConnectionError):
                self.gone.set()
                raise
        elif path.startswith("/linger"):
            for chunk in chat_chunks(model, True):
                await response.write(chunk)
            await asyncio.sleep(1.0)
        elif path.endswith("/messages"):
            for chunk in anthropic_events(model):
                await response.write(chunk)
        elif path.endswith("/responses"):
            for chunk in responses_events(model):
                await response.write(chunk)
        else:
            options = data.get("stream_options") or {}
            for chunk in chat_chunks(model, bool(options.get("include_usage"))):
                await response.write(chunk)
        await response.write_eof()
        return response

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"the fake upstream got {len(self.received)} requests, not {count}")


class InProcessProxy:
    """The proxy and its recorder, as ``python -m harness.proxy --record-only`` runs them."""

    def __init__(self, settings: ProxySettings, log: Path) -> None:
        self.warnings: list[str] = []
        self.recorder = Recorder(LogFile(log), SessionResolver(settings.session_header), self.warnings.append)
        self.proxy = Proxy(settings, self.recorder.submit)
        self._loop = LoopThread()
        self._loop.call(self.proxy.start())

    @property
    def url(self) -> str:
        return self.proxy.url

    def close(self) -> None:
        self._loop.call(self.proxy.stop())
        self._loop.close()
        self.recorder.close()


@contextlib.contextmanager
def running_proxy(upstream: str, log: Path, **settings: Any) -> Iterator[InProcessProxy]:
    proxy = InProcessProxy(ProxySettings(upstream=upstream, port=0, **settings), log)
    try:
        yield proxy
    finally:
        proxy.close()


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def proxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.proxy", *args]


class ProxyProcess:
    """``python -m harness.proxy --port 0 ARGS`` as a user runs it (Ctrl-C reaches it), its output
    read as it comes (a full pipe would stall the analysis process)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            proxy_command("--port", "0", *args),
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, COLUMNS="200"),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()
        deadline = time.monotonic() + 60
        while not any("Ctrl-C stops it" in line for line in self.out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the proxy did not start: {''.join(self.out)}{''.join(self.err)}")
            time.sleep(0.05)
        self.url = self.out[0].split()[1]
        self.banner = "".join(self.out)

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def stop(self, timeout: float = 120) -> tuple[int, str, str]:
        """Ctrl-C, then everything it printed: (exit status, stdout, stderr)."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code, "".join(self.out), "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
