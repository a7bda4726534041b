"""The explainer held to the real engine and to a real server: prediction == engine, request by
request, on the shipped logs (plain chats; an agent log with tools, tool calls, Anthropic
bodies and the server's replies)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import TOOLS, TOOLS_TEMPLATE, agent_turns, key_env, run_script, validate
from test_cli import assert_one_line_error

from harness.backend import OfflineBackend
from harness.explain import explain_requests, read_requests
from harness.explain.render import ChatRenderer
from harness.explain.verify import EngineReplay, verify
from harness.servers import ServerProcess

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "agent_trace.jsonl"
TOOLS_LOG = ROOT / "examples" / "agent_tools_log.jsonl"


@pytest.mark.parametrize("scope", ["session", "shared"])
def test_verify_agrees_with_the_engine_on_the_example(
    engine: OfflineBackend, chat_renderer: ChatRenderer, scope: str
) -> None:
    requests, skipped = read_requests(EXAMPLE)
    assert not skipped
    explained = explain_requests(requests, chat_renderer, engine.info.block_size, scope=scope)
    rows = verify(requests, explained, EngineReplay(engine), scope)
    assert len(rows) == 7
    assert [r.engine_cached_tokens for r in rows] == [e.predicted_cached_tokens for e in explained]
    assert [r.prompt_tokens for r in rows] == [e.prompt_tokens for e in explained]
    assert sum(r.engine_cached_tokens for r in rows) > 0
    # the shared scope serves the second session's first request from the first session's blocks
    assert (explained[2].predicted_cached_tokens > 0) == (scope == "shared")


def test_verify_agrees_on_an_agent_log_with_tools_and_replies(
    engine: OfflineBackend, tools_renderer: ChatRenderer
) -> None:
    requests, skipped = read_requests(TOOLS_LOG)
    assert not skipped
    assert {r.format for r in requests} == {"openai", "anthropic"}
    explained = explain_requests(requests, tools_renderer, engine.info.block_size)
    # The server that recorded the log reported exactly the predicted cached tokens ...
    assert all(e.reconciliation is not None and e.reconciliation.agrees for e in explained)
    # ... and the embedded engine, fed the same tokens and the replies, agrees too.
    rows = verify(requests, explained, EngineReplay(engine), "shared")
    assert [r.engine_cached_tokens for r in rows] == [e.predicted_cached_tokens for e in explained]
    assert all(e.reply_tokens > 0 for e in explained)
    assert [e.hint.kind for e in explained if e.hint is not None] == ["tools_reordered", "timestamp"]
    # replies count: every "extends" goes past its reference prompt into the reply it got
    for e in explained:
        if e.status == "extends":
            reference = next(x for x in explained if x.line == e.reference_line)
            assert e.first_divergence > reference.prompt_tokens


def explain_on_server(
    log: Path, server: ServerProcess, out: Path, key_flag: bool = False
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """``python -m harness.explain LOG --endpoint URL --json OUT`` as a user runs it, with the
    server's key in VLLM_API_KEY (or ``--api-key`` when ``key_flag``); the JSON, checked against
    its schema, and the process. The key is in neither."""
    command = ["-m", "harness.explain", str(log), "--chat-template", str(TOOLS_TEMPLATE)]
    if key_flag:
        proc = run_script(*command, "--endpoint", server.url, "--api-key", server.api_key, "--json", str(out))
    else:
        proc = run_script(*command, "--endpoint", server.url, "--json", str(out), env=key_env(server))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert server.api_key not in proc.stdout + proc.stderr
    assert server.api_key.encode() not in out.read_bytes()
    document = json.loads(out.read_text())
    validate("explain", document)
    return document, proc


def test_explain_verifies_against_a_server_that_renders_the_bodies_itself(
    vllm_server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "explain.json"
    document, proc = explain_on_server(TOOLS_LOG, vllm_server, out)
    assert document["verified"] is True and document["block_size"] == 32
    for row in document["requests"]:
        # the server rendered every body (OpenAI and Anthropic, with tools) to the same tokens
        assert row["engine_prompt_tokens"] == row["prompt_tokens"], row["line"]
        assert row["engine_cached_tokens"] == row["predicted_cached_tokens"], row["line"]
    assert "the engine agrees with the prediction on all 10 requests" in proc.stdout


def test_explain_replay_with_a_wrong_key_is_one_line(vllm_server: ServerProcess, tmp_path: Path) -> None:
    wrong = "kvtest-wrong-key-0815"
    out = tmp_path / "explain.json"
    proc = run_script(
        "-m", "harness.explain", str(TOOLS_LOG), "--endpoint", vllm_server.url, "--json", str(out),
        env={"VLLM_API_KEY": wrong},
    )  # fmt: skip
    assert_one_line_error(
        proc, f"error: {vllm_server.url} refused the API key from VLLM_API_KEY (401 Unauthorized)"
    )
    assert wrong not in proc.stdout + proc.stderr
    assert not out.exists()


def null_content_log(path: Path) -> Path:
    """An agent log in every shape vLLM's server accepts (content parts, a tool call with
    ``"content": null``, a tool message, a name), then the same history with the tool list in
    another order (a break in the system message). The system prompt is long enough for blocks."""
    turns = agent_turns()
    turns[0] = {"role": "system", "content": "You are a coding agent. Use the tools. " * 20}
    lines = [
        {"session_id": "s", "messages": turns[:2], "tools": TOOLS},
        {"session_id": "s", "messages": turns, "tools": TOOLS},
        {"session_id": "s", "messages": turns, "tools": [TOOLS[1], TOOLS[0], TOOLS[2]]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_null_content_tool_calls_and_parts_agree_with_engine_and_server(
    engine: OfflineBackend, tools_renderer: ChatRenderer, vllm_server: ServerProcess, tmp_path: Path
) -> None:
    log = null_content_log(tmp_path / "agent.jsonl")
    requests, _ = read_requests(log)
    explained = explain_requests(requests, tools_renderer, engine.info.block_size)
    assert [e.status for e in explained] == ["cold", "extends", "break"]
    assert explained[2].hint is not None and explained[2].hint.kind == "tools_reordered"
    rows = verify(requests, explained, EngineReplay(engine), "shared")
    assert [r.engine_cached_tokens for r in rows] == [e.predicted_cached_tokens for e in explained]
    # the server renders the bodies itself: the same prompt lengths and cached tokens
    out = tmp_path / "explain.json"
    document, _ = explain_on_server(log, vllm_server, out, key_flag=True)
    for row, e in zip(document["requests"], explained, strict=True):
        assert row["engine_prompt_tokens"] == row["prompt_tokens"] == e.prompt_tokens
        assert row["engine_cached_tokens"] == row["predicted_cached_tokens"] == e.predicted_cached_tokens
