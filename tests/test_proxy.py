"""The proxy without a model: transparency, the log, sessions, and every way a call can go wrong,
against a fake upstream (tests/proxy_helpers.py) with the official SDKs as clients. The same
proxy against a real vLLM server, and the explainer on its log: tests/test_proxy_engine.py."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from conftest import ROOT, validate
from proxy_helpers import FakeUpstream, ProxyProcess, proxy_command, records, running_proxy

from harness.explain import read_requests
from harness.proxy.record import Call, LogFile, Recorder, build_record, redact_query
from harness.proxy.sessions import SessionResolver
from harness.proxy.streams import parse_sse, reassemble
from harness.servers import free_port

SECRET = "sk-proxy-test-SECRET-4e1f"
SECRETS = (SECRET, "ant-SECRET-77", "azure-SECRET-99", "cookie-SECRET-5", "query-SECRET-3", "basic-SECRET-8")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.close()


def raw_request(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (http.client adds only Host and Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def exchange_of(data: bytes) -> dict[str, Any]:
    return dict(json.loads(data))


# --------------------------------------------------------------------------- transparency


def test_any_path_goes_through_unchanged_and_only_api_calls_are_recorded(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    headers = {"Authorization": f"Bearer {SECRET}", "X-Custom": "kept", "X-Session-Id": "s1"}
    with running_proxy(upstream.url, log) as proxy:
        for method, path in (("GET", "/v1/models?b=2&a=1"), ("GET", "/metrics"), ("POST", "/tokenize?x=%2F")):
            body = b'{"prompt": "hi"}' if method == "POST" else None
            status, _, data = raw_request(proxy.url, method, path, body, headers)
            assert status == 200
            seen = exchange_of(data)
            assert seen["method"] == method
            assert seen["raw_path"] == path  # path and query byte for byte, %2F included
            sent = {k.lower(): v for k, v in seen["headers"]}
            assert sent["authorization"] == f"Bearer {SECRET}"  # the client's credentials go upstream
            assert sent["x-custom"] == "kept"
            assert sent["host"] == upstream.url.removeprefix("http://")
            # nothing the client did not send: no User-Agent, Accept-Encoding, Content-Type of aiohttp's
            assert not {"user-agent", "accept-encoding", "content-type"} & set(sent)
            assert base64.b64decode(seen["body"]) == (body or b"")
    assert log.read_text() == ""  # none of these is a recorded API call
    assert proxy.proxy.passed == 3


def test_a_garbage_body_is_forwarded_untouched_and_recorded_as_such(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    garbage = b'{"messages": [\x00\xff not json'
    with running_proxy(upstream.url, log) as proxy:
        status, _, _ = raw_request(
            proxy.url, "POST", "/v1/chat/completions", garbage, {"Content-Type": "text/plain"}
        )
    assert status == 200
    assert base64.b64decode(upstream.received[-1]["body"]) == garbage
    (record,) = records(log)
    assert record["request"] is None and record["status"] == 200
    assert record["request_text"] == garbage.decode("utf-8", errors="replace")
    assert record["notes"] == [f"the request body is not JSON ({len(garbage)} bytes): forwarded as it was"]
    validate("proxy-record", record)
    # the explainer skips it (the server never rendered it) instead of stopping on it
    requests, skipped = read_requests(log)
    assert requests == [] and [s.line for s in skipped] == [1]
    assert "not a JSON object" in skipped[0].error


def test_a_stream_reaches_the_client_piece_by_piece(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The upstream sends its second event only after the client has read the first: a proxy
    that buffered the stream would never deliver the first, and this would time out."""
    upstream.gate.clear()
    with running_proxy(upstream.url, tmp_path / "log.jsonl") as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /gate HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b'{"n": 1}' not in received:
                received += sock.recv(65536)
            assert b'{"n": 2}' not in received
            upstream.gate.set()
            while b'{"n": 2}' not in received:
                received += sock.recv(65536)


# --------------------------------------------------------------------------- the record of a call


def test_streams_through_the_sdks_are_recorded_as_the_clients_assembled_them(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    messages = [{"role": "user", "content": "Fix money.py"}]
    with running_proxy(upstream.url, log) as proxy:
        oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key=SECRET, max_retries=0)
        with oai.chat.completions.stream(
            model="m",
            messages=messages,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        ) as stream:
            chat = stream.get_final_completion()
        with oai.responses.stream(model="m", input="Fix money.py") as rstream:
            final = rstream.get_final_response()
        ant = anthropic.Anthropic(base_url=proxy.url, api_key="ant-SECRET-77", max_retries=0)
        with ant.messages.stream(model="m", max_tokens=50, messages=messages) as astream:  # type: ignore[arg-type]
            message = astream.get_final_message()
    chat_record, responses_record, messages_record = records(log)
    for record in (chat_record, responses_record, messages_record):
        validate("proxy-record", record)
        assert record["stream"] is True and record["status"] == 200 and "incomplete" not in record

    got = chat_record["response"]
    sdk = chat.choices[0].message
    assert got["choices"][0]["message"]["content"] == sdk.content == "Let me look."
    (call,) = got["choices"][0]["message"]["tool_calls"]
    assert call == {
        "id": "call_7",
        "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "money.py"}'},
    }
    assert (
        sdk.tool_calls is not None and sdk.tool_calls[0].function.arguments == call["function"]["arguments"]
    )
    assert got["choices"][0]["finish_reason"] == chat.choices[0].finish_reason == "tool_calls"
    assert got["usage"] == chat.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]
    assert chat_record["request"] == {
        "messages": messages,
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    got = responses_record["response"]
    assert (got["id"], got["status"]) == (final.id, final.status) == ("resp_fake1", "completed")
    assert got["output"][0]["content"][0]["text"] == final.output_text == "Done."
    assert got["usage"] == final.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]

    got = messages_record["response"]
    assert got["content"] == [block.model_dump(exclude_none=True) for block in message.content]
    assert got["content"][1]["input"] == {"path": "money.py"}
    assert got["usage"] == message.usage.model_dump(exclude_none=True)
    assert got["usage"]["cache_read_input_tokens"] == 96  # message_delta's totals replace message_start's
    assert got["stop_reason"] == message.stop_reason == "tool_use"


def test_a_chat_stream_without_usage_says_so_and_add_stream_usage_asks_for_it(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    plain, added = tmp_path / "plain.jsonl", tmp_path / "added.jsonl"
    for log, flag in ((plain, False), (added, True)):
        with running_proxy(upstream.url, log, add_stream_usage=flag) as proxy:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=SECRET, max_retries=0)
            chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True))  # type: ignore[arg-type]
        assert (chunks[-1].usage is not None) == flag  # the client sees the usage chunk only when asked
    (record,) = records(plain)
    assert "usage" not in record["response"]
    assert record["notes"] == [
        "the stream carried no usage: the request did not set stream_options.include_usage "
        "(--add-stream-usage asks for it)"
    ]
    (record,) = records(added)
    assert record["response"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}
    assert "stream_options" not in record["request"]  # the record keeps what the client sent
    sent = json.loads(base64.b64decode(upstream.received[-1]["body"]))
    assert sent["stream_options"] == {"include_usage": True}
    assert record["notes"] == [
        "stream_options.include_usage was added by the proxy (--add-stream-usage): the client also got "
        "the usage chunk"
    ]


def test_credentials_are_never_written(upstream: FakeUpstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    headers = {
        "Authorization": f"Bearer {SECRET}",
        "x-api-key": "ant-SECRET-77",
        "api-key": "azure-SECRET-99",
        "Cookie": "session=cookie-SECRET-5",
        "Proxy-Authorization": "Basic basic-SECRET-8",
        "anthropic-version": "2023-06-01",
        "X-Session-Id": "agent-1",
        "Content-Type": "application/json",
    }
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with running_proxy(upstream.url, log) as proxy:
        for path in ("/v1/chat/completions?api-version=2024-10-21&key=query-SECRET-3", "/v1/messages"):
            status, _, _ = raw_request(proxy.url, "POST", path, body, headers)
            assert status == 200
            sent = {k.lower(): v for k, v in upstream.received[-1]["headers"]}
            assert sent["authorization"] == f"Bearer {SECRET}" and sent["x-api-key"] == "ant-SECRET-77"
    data = log.read_bytes()
    for secret in SECRETS:
        assert secret.encode() not in data
    first, second = records(log)
    assert first["query"] == "api-version=2024-10-21&key=REDACTED"
    assert first["headers"] == {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "X-Session-Id": "agent-1",
    }
    assert first["session_id"] == second["session_id"] == "agent-1"
    assert first["session_source"] == "header X-Session-Id"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_the_log_is_in_the_order_sent_not_the_order_finished(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Five calls sent one after the other while the earlier ones are still running; the first
    answers last. The log has them in the order sent."""
    log = tmp_path / "log.jsonl"
    tags = [f"order-{i}" for i in range(5)]
    upstream.delays.update({tag: 0.1 * (5 - i) for i, tag in enumerate(tags)})
    finished: list[str] = []
    with running_proxy(upstream.url, log) as proxy:
        threads = []
        before = len(upstream.received)
        for i, tag in enumerate(tags):
            body = json.dumps({"tag": tag, "messages": [{"role": "user", "content": tag}]}).encode()

            def send(body: bytes = body, tag: str = tag) -> None:
                raw_request(
                    proxy.url, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
                )
                finished.append(tag)

            thread = threading.Thread(target=send)
            thread.start()
            threads.append(thread)
            upstream.wait_for(before + i + 1)  # sent (and received upstream) before the next one
        for thread in threads:
            thread.join(10)
    assert finished == tags[::-1]
    assert [r["request"]["tag"] for r in records(log)] == tags


# --------------------------------------------------------------------------- failures


def test_upstream_down_gives_502_naming_it_and_the_proxy_stays_up(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    dead = f"http://127.0.0.1:{free_port()}"
    with running_proxy(dead, log) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=SECRET, max_retries=0)
        for _ in range(2):  # and again: still up
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert failed.value.status_code == 502
            assert f"cannot reach upstream {dead}" in failed.value.message
        status, _, data = raw_request(proxy.url, "GET", "/v1/models")
    assert status == 502
    assert data.count(b"\n") == 1 and json.loads(data)["error"]["type"] == "upstream_unreachable"
    first, second = records(log)
    assert first["status"] == 502 and first["error"].startswith(f"cannot reach upstream {dead}")
    assert first["response"]["error"]["code"] == 502


def test_a_silent_upstream_gives_504(upstream: FakeUpstream, tmp_path: Path) -> None:
    with running_proxy(upstream.url, tmp_path / "log.jsonl", read_timeout_s=0.3) as proxy:
        status, _, data = raw_request(proxy.url, "GET", "/slow")
    assert status == 504
    assert json.loads(data)["error"]["message"] == (
        f"harness.proxy: upstream {upstream.url} sent nothing for 0.3 s (--timeout)"
    )


def test_a_stream_the_upstream_cuts_is_cut_for_the_client_and_recorded_incomplete(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    with running_proxy(upstream.url, log) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/cut/v1/chat/completions", body=b'{"stream": true, "messages": []}')
        response = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()  # the client sees the cut: the chunked body never ends
        conn.close()
    assert b'{"n": 2}' in cut.value.partial  # what came before the cut came through
    (record,) = records(log)
    assert record["incomplete"] is True and record["status"] == 200
    assert record["error"] == f"upstream {upstream.url} cut the response short"


def test_a_client_that_goes_away_cancels_the_upstream_call(upstream: FakeUpstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    upstream.gone.clear()
    with running_proxy(upstream.url, log) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/endless/v1/messages", body=b'{"stream": true, "messages": []}')
        response = conn.getresponse()
        assert b"data:" in response.fp.readline() + response.fp.readline()  # type: ignore[union-attr]
        conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]  # the client goes away mid-stream
        conn.close()
        assert upstream.gone.wait(5), "the upstream call was not cancelled"
    (record,) = records(log)
    assert record["incomplete"] is True and record["status"] == 200
    assert record["error"] == "the client went away mid-response"


def test_a_client_that_closes_after_the_end_of_the_stream_got_it_all(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """SDKs close the connection as soon as they read ``data: [DONE]``, before the HTTP body's own
    end: the record is complete."""
    log = tmp_path / "log.jsonl"
    with running_proxy(upstream.url, log) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/linger/v1", api_key=SECRET, max_retries=0)
        chunks = list(client.chat.completions.create(model="m", messages=[], stream=True))
        assert chunks[-1].usage is not None
        time.sleep(1.5)
    (record,) = records(log)
    assert "incomplete" not in record and "error" not in record
    assert record["response"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}


def test_a_full_disk_is_reported_once_and_recording_goes_on() -> None:
    warnings: list[str] = []
    recorder = Recorder(LogFile(Path("/dev/full")), SessionResolver(), warnings.append)
    for seq in range(3):
        recorder.submit(call(seq, b'{"messages": [{"role": "user", "content": "hi"}]}'))
    recorder.close()
    assert recorder.lost == 3 and recorder.recorded == 0
    assert len(warnings) == 1
    assert "No space left on device" in warnings[0] and "traffic goes on" in warnings[0]


# --------------------------------------------------------------------------- pieces


def call(seq: int, body: bytes, status: int = 200, **fields: Any) -> Call:
    return Call(
        seq=seq,
        api="chat",
        started=1796188846.5,
        url="http://up/v1/chat/completions",
        query="",
        headers={},
        body=body,
        status=status,
        **({"session_header": None} | fields),
    )


def test_sessions_come_from_the_header_then_the_body_in_the_documented_order() -> None:
    resolver = SessionResolver("X-Session-Id")
    body: dict[str, Any] = {
        "prompt_cache_key": "pck",
        "conversation": {"id": "conv_1"},
        "metadata": {"session_id": "meta-s", "user_id": "user_abc_session_42"},
        "session_id": "body-s",
        "user": "u",
        "safety_identifier": "safe",
    }
    assert resolver.resolve("hdr", body).id == "hdr"
    expected = ["pck", "conv_1", "meta-s", "user_abc_session_42", "body-s", "u", "safe", None]
    order = [
        "prompt_cache_key",
        "conversation",
        "metadata",
        "metadata",
        "session_id",
        "user",
        "safety_identifier",
    ]
    seen = []
    for key in [*order, None]:
        seen.append(resolver.resolve(None, body).id)
        if key == "metadata":
            inner = body["metadata"]
            inner.pop(next(iter(inner)))
        elif key is not None:
            body.pop(key)
    assert seen == expected
    # a Responses chain: previous_response_id inherits the session of the call that made it
    first = resolver.resolve(None, {"prompt_cache_key": "chain"})
    resolver.remember({"object": "response", "id": "resp_1"}, first)
    follow = resolver.resolve(None, {"previous_response_id": "resp_1"})
    assert (follow.id, follow.source) == ("chain", "previous_response_id")
    assert resolver.resolve(None, {"previous_response_id": "resp_unknown"}).id is None


def test_a_record_of_an_error_is_skipped_by_the_explainer(tmp_path: Path) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    ok = build_record(
        call(0, body, chunks=[b'{"choices": []}'], content_type="application/json"), SessionResolver()
    )
    refused = build_record(
        call(
            1, body, 401, chunks=[b'{"error": {"message": "Unauthorized"}}'], content_type="application/json"
        ),
        SessionResolver(),
    )
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(ok) + "\n" + json.dumps(refused) + "\n")
    warned: list[str] = []
    requests, skipped = read_requests(log, warn=warned.append)
    assert [r.line for r in requests] == [1]
    assert [s.line for s in skipped] == [2]
    assert "HTTP 401" in warned[0] and "the server did not serve it" in warned[0]
    assert refused["response"] == {"error": {"message": "Unauthorized"}}


def test_sse_parsing_follows_the_rules() -> None:
    raw = b": comment\r\nevent: a\r\ndata: 1\r\ndata: 2\r\n\r\ndata:3\n\ndata: cut-off"
    assert [(e.event, e.data) for e in parse_sse(raw)] == [("a", "1\n2"), (None, "3")]
    # a Responses stream cut before response.completed: the snapshot and the items done so far
    created = {"type": "response.created", "response": {"id": "r", "object": "response", "output": []}}
    item = {"type": "response.output_item.done", "output_index": 0, "item": {"type": "message", "id": "m"}}
    partial = reassemble(
        "responses", ("data: " + json.dumps(created) + "\n\ndata: " + json.dumps(item) + "\n\n").encode()
    )
    assert not partial.complete and partial.body == {
        "id": "r",
        "object": "response",
        "output": [{"type": "message", "id": "m"}],
    }


def test_query_credentials_are_redacted() -> None:
    assert redact_query("api-version=1&key=abc&access_token=t&x-goog-api-key=g&beta=true") == (
        "api-version=1&key=REDACTED&access_token=REDACTED&x-goog-api-key=REDACTED&beta=true"
    )


# --------------------------------------------------------------------------- the command


def run_command(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(proxy_command(*args), cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def test_bad_input_is_one_line_and_exit_2_before_anything_starts(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    existing = tmp_path / "old.jsonl"
    existing.write_text('{"keep": "me"}\n')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    cases = {
        ("--upstream", "localhost:8000"): "not an http(s) URL: 'localhost:8000'",
        ("--upstream", upstream.url, "--log", str(existing)): f"--log {existing} exists: pass --append",
        ("--upstream", upstream.url, "--log", str(tmp_path / "no" / "x.jsonl")): "does not exist",
        (
            "--upstream",
            upstream.url,
            "--log",
            str(tmp_path / "new.jsonl"),
            "--port",
            port,
        ): "the port is in use",
        (
            "--upstream",
            upstream.url,
            "--log",
            str(tmp_path / "new.jsonl"),
            "--timeout",
            "0",
        ): "--timeout must be",
        ("--upstream", upstream.url, "--log", str(tmp_path / "new.jsonl"), "--provider", "nope:x"): "nope",
        ("--upstream", upstream.url, "--bogus"): "unrecognized arguments: --bogus",
    }
    try:
        for args, expected in cases.items():
            proc = run_command(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
                args,
                proc.stderr,
            )
            assert "Traceback" not in proc.stderr
    finally:
        busy.close()
    assert existing.read_text() == '{"keep": "me"}\n'
    assert not (tmp_path / "new.jsonl").exists()  # nothing created by a run that did not start


def test_ctrl_c_writes_everything_and_says_where_the_log_is(upstream: FakeUpstream, tmp_path: Path) -> None:
    log = tmp_path / "agent.jsonl"
    log.write_text('{"earlier": "line"}\n')
    proxy = ProxyProcess(
        "--upstream", upstream.url, "--log", str(log), "--append", "--record-only", "--host", "0.0.0.0"
    )
    try:
        url = proxy.url.replace("0.0.0.0", "127.0.0.1")
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
        assert raw_request(url, "POST", "/v1/chat/completions", body, headers)[0] == 200
        code, out, err = proxy.stop(30)
    finally:
        proxy.kill()
    assert code == 0, err
    assert f"log       {log} (appending after its 1 lines; mode 644)" in proxy.banner
    assert f"log: {log.resolve()} (1 calls recorded, 0 other requests forwarded)" in out
    assert "warning: listening on 0.0.0.0: anyone who can reach this machine" in err
    assert "is readable by others (mode 644) and will hold prompts: chmod 600 it" in err
    assert SECRET not in out + err
    lines = log.read_text().splitlines()
    assert lines[0] == '{"earlier": "line"}' and json.loads(lines[1])["request"] == json.loads(body)


def test_the_record_schema_covers_a_failed_call(tmp_path: Path) -> None:
    record = build_record(
        call(
            0,
            b"{}",
            incomplete=True,
            error="the client went away mid-response",
            content_type="text/event-stream",
        ),
        SessionResolver(),
    )
    validate("proxy-record", record)
    assert record["incomplete"] is True and record["response"] is None


# --------------------------------------------------------------------------- the live analysis


def chat_record(seq: int, messages: list[dict[str, Any]], cached: int | None, status: int = 200) -> bytes:
    body = json.dumps({"model": "m", "messages": messages}).encode()
    reply = {"role": "assistant", "content": "Looking at it."}
    response: dict[str, Any] = {"id": f"c{seq}", "object": "chat.completion"}
    response["choices"] = [{"index": 0, "message": reply, "finish_reason": "stop"}]
    if cached is not None:
        response["usage"] = {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": cached}}
    if status != 200:
        response = {"error": {"message": "Unauthorized"}}
    chunks = [json.dumps(response).encode()]
    c = call(seq, body, status, chunks=chunks, content_type="application/json", session_header="agent")
    return json.dumps(build_record(c, SessionResolver())).encode()


def test_the_live_analysis_fails_open_and_says_why_once(chat_renderer: Any) -> None:
    """Records the explainer cannot read, calls that failed, and an error inside the analysis each
    get a line saying so; the records after them are analysed as usual."""
    from io import StringIO

    from rich.console import Console

    from harness.explain import LogExplainer
    from harness.explain.formats import RecordReader
    from harness.explain.run import LogRun
    from harness.proxy.live import LiveSettings, Worker

    settings = LiveSettings("http://127.0.0.1:9", None, None, 32, "shared", (), None, 12, False)
    worker = Worker(settings)
    out = StringIO()
    worker.console = Console(file=out, width=400)
    worker.block_size, worker.model_name = 32, "SmolLM2"
    explainer = LogExplainer(chat_renderer, 32)
    worker.run_, worker.reader = LogRun(explainer, max_held=0), RecordReader()
    system = {"role": "system", "content": "You are a careful agent. " * 30}
    first = [system, {"role": "user", "content": "Fix money.py."}]
    second = [
        *first,
        {"role": "assistant", "content": "Looking at it."},
        {"role": "user", "content": "Go on."},
    ]
    worker.one(1, chat_record(0, first, None))
    unknown = json.dumps({"model": "m", "prompt": "a completions body"}).encode()
    worker.one(2, json.dumps(build_record(call(1, unknown, chunks=[b"{}"]), SessionResolver())).encode())
    worker.one(3, chat_record(2, second, None, status=401))
    real = explainer.explain
    explainer.explain = lambda request: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    worker.one(4, chat_record(3, second, None))
    worker.one(5, chat_record(4, second, None))
    explainer.explain = real  # type: ignore[method-assign]
    worker.one(6, chat_record(5, second, None))
    worker.summary()
    lines = out.getvalue().splitlines()
    text = out.getvalue()
    assert re.search(
        r"line 1 agent chat 200 \| prompt [\d,]+ \| reported cached - \| predicted 0 \| cold", text
    )
    assert 'line 2 - chat 200 | not analysed: no "messages" list' in text
    assert "line 3 agent chat 401 | not analysed: HTTP 401: the server did not serve it" in text
    assert sum("(reported once)" in line for line in lines) == 1
    assert "analysis error on line 4: RuntimeError: boom (reported once)" in text
    assert re.search(
        r"line 6 agent chat 200 \| prompt [\d,]+ \| reported cached - \| predicted 192 \| extends", text
    )
    assert "2 calls analysed, 4 not" in text


def test_the_analysis_process_ends_when_the_proxy_is_killed(upstream: FakeUpstream, tmp_path: Path) -> None:
    import psutil

    proxy = ProxyProcess("--upstream", upstream.url, "--log", str(tmp_path / "log.jsonl"))
    try:
        deadline = time.monotonic() + 60
        while not any("analysis: loading" in line for line in proxy.out) and time.monotonic() < deadline:
            time.sleep(0.1)  # the analysis process is running (loading vLLM's renderer)
        children = psutil.Process(proxy.proc.pid).children()
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert workers, [c.cmdline() for c in children]
    finally:
        proxy.kill()  # SIGKILL: nothing of the proxy's runs after it
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "the analysis process outlived the proxy"


def test_the_analysis_follows_the_log_from_where_this_run_began(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """With --append, the analysis starts after the lines already in the log, numbered as the file
    numbers them, and at Ctrl-C reads to the end of the log before its summary."""
    log = tmp_path / "agent.jsonl"
    log.write_text('{"earlier": 1}\n{"earlier": 2}')  # the last line unfinished: the proxy ends it
    log.chmod(0o600)
    proxy = ProxyProcess("--upstream", upstream.url, "--log", str(log), "--append")
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=SECRET, max_retries=0)
        system = {"role": "system", "content": "You are a careful agent. " * 30}
        first = [system, {"role": "user", "content": "Fix money.py."}]
        client.chat.completions.create(model="m", messages=first, extra_headers={"X-Session-Id": "a"})  # type: ignore[arg-type]
        second = [*first, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Go on."}]
        client.chat.completions.create(model="m", messages=second, extra_headers={"X-Session-Id": "a"})  # type: ignore[arg-type]
        # served while vLLM's renderer was still loading in the analysis process: never waited for
        assert not any("analysis ready" in line for line in proxy.out)
        code, out, err = proxy.stop()
    finally:
        proxy.kill()
    assert code == 0, err
    assert re.search(r"line 3 a chat 200 \| prompt 201 \| reported cached 0 \| predicted 0 \| cold", out), out
    assert re.search(
        r"line 4 a chat 200 \| prompt 216 \| reported cached 0 \| predicted 192 \| extends", out
    ), out
    assert "the server counted 9 prompt tokens, this rendering 201" in out  # the fake's usage, named
    assert "line 1 " not in out and "line 2 " not in out
    assert "2 requests" in out  # the summary covers this run's calls
    assert len(log.read_text().splitlines()) == 4
