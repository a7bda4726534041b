"""The proxy between the official SDKs and a real vLLM server: every call's record is what the
client sent and got, the live lines show the server's cached tokens next to the prediction, and
``python -m harness.explain`` on the log predicts the cached tokens the server reported.

One agent per API, each with tools and a tool call in its history: OpenAI Chat Completions
(plain, streamed with a real tool call streamed in pieces, then a turn whose tool list comes in
another order: a break), Anthropic Messages (plain, then streamed with ``tool_use`` and
``tool_result`` in the history and a forced tool call), the Responses API (plain, then streamed
with ``function_call`` and ``function_call_output`` items). Each agent's system prompt starts with
a fresh nonce, so nothing the shared server cached for earlier tests serves these prompts.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from conftest import TOOLS, TOOLS_TEMPLATE, run_script, validate
from openai.lib.streaming.chat import ChatCompletionStreamState
from proxy_helpers import ProxyProcess, records

from harness.servers import ServerProcess

pytestmark = pytest.mark.engine

RULES = "Read a file before you change it; run the tests before you claim success; keep changes small. " * 4
ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


class Sent:
    """The request bodies the SDKs put on the wire (a request hook of their HTTP clients: httpx for
    openai, httpx2 for anthropic)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request | httpx2.Request) -> None:
        self.bodies.append(json.loads(request.content))


def valid_arguments(arguments: str) -> str:
    """A tiny model's streamed tool arguments may stop mid-JSON (max_tokens); an agent would have
    to repair them before it runs the tool and sends the call back in its history."""
    try:
        json.loads(arguments)
        return arguments
    except ValueError:
        return '{"path": "money.py"}'


def chat_agent(client: openai.OpenAI, nonce: str) -> list[Any]:
    """Three turns; what the client got back from each (the raw JSON, or the SDK's final stream)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"Session {nonce}. You are a coding agent. {RULES}"},
        {"role": "user", "content": "Fix the rounding bug in money.py."},
    ]
    common = {"model": client.model, "temperature": 0.0}  # type: ignore[attr-defined]
    raw = client.chat.completions.with_raw_response.create(
        messages=messages, tools=TOOLS, tool_choice="none", max_tokens=12, **common
    )
    first = raw.http_response.json()
    messages += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Read the file first."},
    ]
    named = {"type": "function", "function": {"name": "read_file"}}
    state = ChatCompletionStreamState()  # the SDK's own assembly of a stream (no parsing)
    for chunk in client.chat.completions.create(
        messages=messages,
        tools=TOOLS,
        tool_choice=named,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        **common,
    ):
        state.handle_chunk(chunk)
    second = state.current_completion_snapshot
    call = second.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": valid_arguments(call.function.arguments),
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "def round_amount(x):\n    return round(x, 2)"},
        {"role": "user", "content": "Now fix it."},
    ]
    reordered = [TOOLS[1], TOOLS[0], TOOLS[2]]  # the agent rebuilt its tool list: a break
    raw = client.chat.completions.with_raw_response.create(
        messages=messages, tools=reordered, tool_choice="none", max_tokens=12, **common
    )
    return [first, second, raw.http_response.json()]


def anthropic_agent(client: anthropic.Anthropic, model: str, nonce: str) -> list[Any]:
    system = [{"type": "text", "text": f"Session {nonce}. You are a careful coding agent. {RULES}"}]
    question = {"role": "user", "content": [{"type": "text", "text": "Fix the rounding bug in money.py."}]}
    # temperature is no longer a parameter of this SDK's create(); vLLM still reads it from the body
    common = {"model": model, "extra_body": {"temperature": 0.0}, "system": system, "tools": ANTHROPIC_TOOLS}
    common["metadata"] = {"user_id": "messages-agent"}  # its session, read from the body
    raw = client.messages.with_raw_response.create(
        messages=[question], tool_choice={"type": "none"}, max_tokens=12, **common
    )
    first = raw.http_response.json()
    history = [
        question,
        {
            "role": "assistant",
            "content": [
                *first["content"],
                {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "money.py"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "def round_amount(x): ..."},
                {"type": "text", "text": "Run the tests next."},
            ],
        },
    ]
    with client.messages.stream(
        messages=history, tool_choice={"type": "tool", "name": "run_tests"}, max_tokens=24, **common
    ) as stream:
        second = stream.get_final_message()
    return [first, second]


def responses_agent(client: openai.OpenAI, nonce: str) -> list[Any]:
    common = {
        "model": client.model,  # type: ignore[attr-defined]
        "instructions": f"Session {nonce}. You answer in one short sentence. {RULES}",
        "tools": RESPONSES_TOOLS,
        "temperature": 0.0,
        "max_output_tokens": 12,
        "prompt_cache_key": "responses-agent",
    }
    raw = client.responses.with_raw_response.create(input="Fix the rounding bug in money.py.", **common)
    first = raw.http_response.json()
    items = [
        {"role": "user", "content": "Fix the rounding bug in money.py."},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "read_file",
            "arguments": '{"path": "money.py"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "def round_amount(x): ..."},
        {"role": "user", "content": "What is wrong with it?"},
    ]
    with client.responses.stream(input=items, **common) as stream:
        second = stream.get_final_response()
    return [first, second]


LIVE = re.compile(
    r" line (\d+) (\S+) (\S+) (\d+)(?: incomplete)? \| prompt ([\d,-]+) \| reported cached ([\d,-]+) \| (.*)"
)


def live_lines(out: str) -> dict[int, re.Match[str]]:
    return {int(m.group(1)): m for m in (LIVE.search(line) for line in out.splitlines()) if m}


def test_sdk_calls_through_the_proxy_are_logged_as_sent_and_got_and_explained(
    vllm_server: ServerProcess, tmp_path: Path
) -> None:
    log = tmp_path / "agent.jsonl"
    proxy = ProxyProcess(
        "--upstream", vllm_server.url, "--log", str(log), "--chat-template", str(TOOLS_TEMPLATE)
    )
    sent = Sent()
    try:
        http_client = httpx.Client(event_hooks={"request": [sent]}, timeout=600)
        model = (
            openai.OpenAI(base_url=vllm_server.url + "/v1", api_key=vllm_server.api_key)
            .models.list()
            .data[0]
            .id
        )
        oai = openai.OpenAI(
            base_url=proxy.url + "/v1",
            api_key=vllm_server.api_key,
            http_client=http_client,
            max_retries=0,
            default_headers={"X-Session-Id": "chat-agent"},
        )
        oai.model = model  # type: ignore[attr-defined]
        got = chat_agent(oai, secrets.token_hex(4))
        ant_client = httpx2.Client(event_hooks={"request": [sent]}, timeout=600)
        ant = anthropic.Anthropic(
            base_url=proxy.url, api_key=vllm_server.api_key, http_client=ant_client, max_retries=0
        )
        got += anthropic_agent(ant, model, secrets.token_hex(4))
        plain = openai.OpenAI(
            base_url=proxy.url + "/v1", api_key=vllm_server.api_key, http_client=http_client, max_retries=0
        )
        plain.model = model  # type: ignore[attr-defined]
        got += responses_agent(plain, secrets.token_hex(4))
        code, out, err = proxy.stop()
    finally:
        proxy.kill()
    assert code == 0, err
    print(out)  # shown when an assertion below fails

    logged = records(log)
    assert len(logged) == len(sent.bodies) == len(got) == 7
    for number, (record, body) in enumerate(zip(logged, sent.bodies, strict=True), 1):
        validate("proxy-record", record)
        assert record["request"] == body, number  # what the client sent, as it sent it
        assert record["status"] == 200 and "incomplete" not in record, number
    # what the clients got: the raw JSON of a plain call, the SDK's own assembly of a stream
    for number in (1, 3, 4, 6):
        assert logged[number - 1]["response"] == got[number - 1], number
    chat = logged[1]["response"]["choices"][0]
    final = got[1].choices[0]
    (call,) = chat["message"]["tool_calls"]  # streamed in pieces: id and name first, then arguments
    sdk_call = final.message.tool_calls[0]
    assert (call["id"], call["function"]["name"]) == (sdk_call.id, sdk_call.function.name)
    assert (
        call["function"]["arguments"] == sdk_call.function.arguments
        and len(call["function"]["arguments"]) > 2
    )
    assert chat["finish_reason"] == final.finish_reason
    assert logged[1]["response"]["usage"] == got[1].usage.model_dump(exclude_none=True)
    message = logged[4]["response"]
    assert message["content"] == [block.model_dump(exclude_none=True) for block in got[4].content]
    assert message["content"][0]["type"] == "tool_use" and message["content"][0]["name"] == "run_tests"
    assert message["usage"] == got[4].usage.model_dump(exclude_none=True)
    assert message["stop_reason"] == got[4].stop_reason
    response = logged[6]["response"]
    assert response["id"] == got[6].id and response["output"][0]["id"] == got[6].output[0].id
    assert response["usage"] == got[6].usage.model_dump(mode="json", exclude_none=True)
    assert [r["session_id"] for r in logged] == ["chat-agent"] * 3 + ["messages-agent"] * 2 + [
        "responses-agent"
    ] * 2
    assert [r["stream"] for r in logged] == [False, True, False, False, True, False, True]
    assert vllm_server.api_key.encode() not in log.read_bytes() or vllm_server.api_key == "EMPTY"

    # The live lines: the server's count next to the explainer's prediction, per call.
    lines = live_lines(out)
    assert sorted(lines) == list(range(1, 8)), out
    for number in range(1, 8):  # Chat Completions, Messages and Responses: the explainer reads them all
        predicted = re.match(r"predicted ([\d,]+) \|", lines[number].group(7))
        assert predicted is not None, lines[number].group(0)
        assert lines[number].group(6) == predicted.group(1), lines[number].group(0)  # reported == predicted
    assert lines[3].group(7).endswith("| break")
    assert "tools_reordered" in out
    assert int(lines[2].group(6).replace(",", "")) > 0  # the second turn extended the first
    assert "the reported cached tokens" in out and "agree with the prediction on 7 of 7" in out
    assert f"log: {log.resolve()} (7 calls recorded" in out

    # The explainer on the log, afterwards: the same predictions, equal to what the server reported.
    result = tmp_path / "explain.json"
    proc = run_script(
        "-m",
        "harness.explain",
        str(log),
        "--chat-template",
        str(TOOLS_TEMPLATE),
        "--json",
        str(result),
        "--skip-bad",
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["line"]: row for row in json.loads(result.read_text())["requests"]}
    assert set(rows) == set(range(1, 8))  # every call, the Responses ones included
    for row in rows.values():
        assert row["reported_cached_tokens"] == row["predicted_cached_tokens"], row
    assert rows[3]["status"] == "break" and rows[3]["hint"] == "tools_reordered"
    assert [f"{rows[n]['predicted_cached_tokens']:,}" for n in range(1, 8)] == [
        lines[n].group(6) for n in range(1, 8)
    ]  # the live analysis and the explainer afterwards: the same counts
