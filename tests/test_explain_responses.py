"""OpenAI Responses API bodies in the explainer: read, chained by ``previous_response_id``,
rendered through vLLM's own ``/v1/responses`` code, and held to a real server.

The unit tests need no engine (vLLM's renderer only). Each rendering test writes the same
conversation out again as a Chat Completions body, the way vLLM's ``construct_input_messages``
documents the conversion (instructions as a system message, a ``function_call`` item as an
assistant tool call, a ``function_call_output`` as a tool message, an earlier response's
``message`` items as assistant turns), and asks for the very same token IDs. The ``engine``
tests record a log with the official ``openai`` SDK (``client.responses.create``) against the
session's vLLM server and explain it: every prompt and cached-token count the server reported
must be predicted exactly, on the server's replay too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TOOLS_TEMPLATE, run_script, validate

from harness.errors import UserError
from harness.explain import explain_requests, parse_record, read_requests
from harness.explain.formats import RESPONSES, ChatRequest
from harness.explain.provider_view import segments_of
from harness.explain.render import ChatRenderer
from harness.servers import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

INSTRUCTIONS = "You are a coding agent for a Python repository. Use the tools; answer in one short sentence."
FLAT_TOOLS = [
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
    {
        "type": "function",
        "name": "run_tests",
        "description": "Run the test suite.",
        "parameters": {"type": "object", "properties": {"target": {"type": "string"}}},
    },
]


def chat_tools(flat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same tools in Chat Completions shape."""
    return [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in flat]


def response(rid: str, *items: dict[str, Any], input_tokens: int = 0, cached: int = 0) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "status": "completed",
        "output": list(items),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 32},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + 5,
        },
    }


def text_item(text: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call_item(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "fc_1",
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


def write_log(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- reading


def test_a_proxy_record_with_a_responses_body_and_its_final_response_reads() -> None:
    record = {
        "session_id": "agent-1",
        "timestamp": "2026-12-02T10:00:00Z",
        "url": "http://127.0.0.1:8000/v1/responses",
        "request": {"model": "m", "instructions": INSTRUCTIONS, "input": "Hi.", "tools": FLAT_TOOLS},
        "response": response("resp_1", text_item("Hello."), input_tokens=258, cached=160),
    }
    request = parse_record(json.dumps(record), 3)
    assert (request.line, request.format, request.session_id) == (3, RESPONSES, "agent-1")
    assert request.timestamp == 1796205600.0
    logged = request.response
    assert logged is not None
    assert (logged.response_id, logged.finish_reason, logged.message["content"]) == (
        "resp_1",
        "stop",
        "Hello.",
    )
    assert logged.usage is not None
    assert (logged.usage.prompt_tokens, logged.usage.cached_tokens, logged.usage.cache_write_tokens) == (
        258,
        160,
        32,
    )
    assert logged.output is not None and logged.output[0]["type"] == "message"


@pytest.mark.parametrize(
    ("body", "url", "reply", "finish"),
    [
        # a bare body: "input" where a chat body has "messages"
        ({"model": "m", "input": [{"role": "user", "content": "Hi."}]}, None, None, None),
        # the URL says so even for a body that could be read otherwise
        ({"model": "m", "input": "Hi."}, "/v1/responses", None, None),
        # a reply with a tool call; one cut by max_output_tokens
        ({"input": "Hi."}, None, response("r", call_item("c", "read_file", {"path": "a"})), "tool_calls"),
        (
            {"input": "Hi."},
            None,
            response("r", text_item("He"))
            | {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}},
            "length",
        ),
    ],
)
def test_responses_bodies_are_detected(
    body: dict[str, Any], url: str | None, reply: dict[str, Any] | None, finish: str | None
) -> None:
    record: dict[str, Any] = (
        {"request": body, "response": reply} if url is None else {"url": url, "request": body}
    )
    request = parse_record(json.dumps(record if url or reply else body), 1)
    assert request.format == RESPONSES
    assert (request.response.finish_reason if request.response else None) == finish


def test_a_failed_response_is_no_reply() -> None:
    failed = response("resp_9") | {"status": "failed", "output": []}
    request = parse_record(json.dumps({"request": {"input": "Hi."}, "response": failed}), 1)
    assert request.response is None


def test_previous_response_id_names_the_earlier_record_and_its_session(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "chain.jsonl",
        [
            {"session_id": 42, "request": {"input": "One."}, "response": response("resp_a", text_item("A."))},
            {"request": {"input": "Two.", "previous_response_id": "resp_a"}, "response": response("resp_b")},
            {"request": {"input": "Three.", "previous_response_id": "resp_b"}},
        ],
    )
    requests, _ = read_requests(log)
    assert [r.previous.line if r.previous else None for r in requests] == [None, 1, 2]
    # a chain of responses is one conversation: the session carries along it
    assert [r.session_id for r in requests] == ["42", "42", "42"]


def test_a_missing_previous_response_is_one_error_naming_the_line(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "orphan.jsonl",
        [
            {"request": {"input": "One."}},  # logged without its response: nothing to continue
            {"request": {"input": "Two.", "previous_response_id": "resp_gone"}},
        ],
    )
    with pytest.raises(UserError) as info:
        read_requests(log)
    assert str(info.value) == (
        f'{log}: line 2: previous_response_id "resp_gone" is not the response of an earlier line of '
        "this log (the server would answer 404): log the request that produced it with its response, "
        "before this line"
    )
    # the command line says it in one line, exit 2, before vLLM is imported
    proc = run_script("-m", "harness.explain", str(log))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {info.value}"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": 7}, 'no "messages" list'),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            'input item 0 (function_call) has no "call_id" string',
        ),
        ({"input": [{"role": "user"}]}, 'input item 0 (message) has no "content" string or parts'),
        (
            {"input": [{"role": "user", "content": [{"text": "x"}]}]},
            'input item 0 (message) has no "content" string or parts',
        ),
        ({"input": ["Hi."]}, "input item 0 is not an object"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c"}]},
            'input item 0 (function_call_output) has no "output"',
        ),
        ({"input": [{"content": "no role, no type"}]}, 'input item 0 has no "type" (or "role")'),
        ({"input": "Hi.", "instructions": ["x"]}, '"instructions" must be a string'),
        ({"input": "Hi.", "tools": [{"name": "f"}]}, '"tools" must be a list of objects with a "type"'),
    ],
)
def test_malformed_responses_bodies_are_one_error_each(body: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as info:
        parse_record(json.dumps(body), 4)
    assert str(info.value).startswith("line 4: ")
    assert message in str(info.value)


def test_a_hosted_api_reads_the_whole_chain() -> None:
    """Under --provider the chain is read as OpenAI documents it: the earlier input and *all* the
    earlier output (vLLM keeps only the output's messages), the earlier instructions dropped."""
    first = parse_record(
        json.dumps(
            {
                "request": {"instructions": "Old rules.", "input": "One."},
                "response": response(
                    "resp_h1", text_item("A."), call_item("call_7", "read_file", {"path": "a"})
                ),
            }
        ),
        1,
    )
    second = parse_record(
        json.dumps({"instructions": "New rules.", "input": "Two.", "previous_response_id": "resp_h1"}),
        2,
        earlier={"resp_h1": first},
    )
    texts = [segment.text for segment in segments_of(second)]
    assert texts[0] == "New rules." and "Old rules." not in texts
    assert texts[1:3] == ["One.", "A."] and "call_7" in texts[3] and texts[4] == "Two."
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "assistant", "user"]


# --------------------------------------------------------------------------- rendering


def chat(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> ChatRequest:
    body: dict[str, Any] = {"messages": messages}
    if tools:
        body["tools"] = tools
    return ChatRequest(99, body, "openai", None)


def test_a_responses_body_renders_as_vllm_converts_it_to_chat(tools_renderer: ChatRenderer) -> None:
    body = {
        "model": "m",
        "instructions": INSTRUCTIONS,
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Fix the rounding bug."}],
            },
            call_item("call_1", "read_file", {"path": "money.py"}),
            {"type": "function_call_output", "call_id": "call_1", "output": "def round_amount(x): ..."},
            text_item("It truncates."),
            {"role": "user", "content": "Fix it."},
        ],
        "tools": FLAT_TOOLS,
        "tool_choice": "auto",
    }
    rendered = tools_renderer.render(parse_record(json.dumps(body), 1))
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "money.py"}'},
    }
    same = tools_renderer.render(
        chat(
            [
                {"role": "system", "content": INSTRUCTIONS},
                {"role": "user", "content": "Fix the rounding bug."},
                {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "def round_amount(x): ..."},
                {"role": "assistant", "content": "It truncates."},
                {"role": "user", "content": "Fix it."},
            ],
            chat_tools(FLAT_TOOLS),
        )
    )
    assert rendered.token_ids == same.token_ids
    assert [m["role"] for m in rendered.conversation] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    # the token offsets came with the rendering: a token inside the tool result is in message 3
    where = rendered.text.index("def round_amount")
    index = next(i for i, (start, end) in enumerate(rendered.offsets) if start <= where < end)
    assert tools_renderer.message_at(rendered, index) == 3


def test_previous_response_id_renders_the_chain_as_vllm_resolves_it(tools_renderer: ChatRenderer) -> None:
    first = parse_record(
        json.dumps(
            {
                "request": {
                    "instructions": "Old rules.",
                    "input": "What does money.py do?",
                    "tools": FLAT_TOOLS,
                },
                "response": response(
                    "resp_chain_1",
                    {
                        "id": "rs_1",
                        "type": "reasoning",
                        "summary": [],
                        "content": [{"type": "reasoning_text", "text": "hm"}],
                    },
                    text_item("It rounds amounts."),
                    call_item("call_7", "read_file", {"path": "money.py"}),
                ),
            }
        ),
        1,
    )
    second = parse_record(
        json.dumps(
            {
                "instructions": INSTRUCTIONS,
                "input": "Where is it tested?",
                "previous_response_id": "resp_chain_1",
                "tools": FLAT_TOOLS,
            }
        ),
        2,
        earlier={"resp_chain_1": first},
    )
    explained = explain_requests([first, second], tools_renderer, 32)
    # vLLM: this request's instructions (the earlier ones do not carry over), the earlier
    # request's messages, the earlier output's message items (not its reasoning, not its tool
    # call), then this input.
    same = tools_renderer.render(
        chat(
            [
                {"role": "system", "content": INSTRUCTIONS},
                {"role": "user", "content": "What does money.py do?"},
                {"role": "assistant", "content": "It rounds amounts."},
                {"role": "user", "content": "Where is it tested?"},
            ],
            chat_tools(FLAT_TOOLS),
        )
    )
    assert list(explained[1].token_ids) == same.token_ids
    # The engine cached the first reply as generated (its text, then the tool call); the chain
    # carries only the text forward, so the second prompt diverges inside that reply.
    assert explained[0].reply_tokens > 0
    assert explained[1].status == "break" and explained[1].message_index == 0  # new instructions


def test_the_reply_tokens_come_from_the_output_items(tools_renderer: ChatRenderer) -> None:
    line = {
        "request": {"input": "Hi.", "tools": FLAT_TOOLS},
        "response": response(
            "resp_r", text_item("Reading it."), call_item("call_2", "read_file", {"path": "a.py"})
        ),
    }
    explained = explain_requests([parse_record(json.dumps(line), 1)], tools_renderer, 32)[0]
    # The same reply logged by Chat Completions: one assistant message with the text and the call.
    call = {
        "id": "call_2",
        "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "a.py"}'},
    }
    turn = {"role": "assistant", "content": "Reading it.", "tool_calls": [call]}
    chat_line = {
        "request": {"messages": [{"role": "user", "content": "Hi."}], "tools": chat_tools(FLAT_TOOLS)},
        "response": {"choices": [{"message": turn, "finish_reason": "tool_calls"}]},
    }
    same = explain_requests([parse_record(json.dumps(chat_line), 1)], tools_renderer, 32)[0]
    assert list(explained.token_ids) == list(same.token_ids)
    assert list(explained.reply_ids) == list(same.reply_ids)
    text = tools_renderer.decode(explained.reply_ids)
    assert text.startswith("Reading it.") and '"read_file"' in text
    assert explained.reply_ids[-1] in tools_renderer.eos_token_ids  # up to the end of turn
    assert (
        explained.reply_tokens == len(explained.reply_ids) - 1 and explained.reply_tokens_source == "rendered"
    )


def test_numeric_session_ids_in_the_body_never_refuse_it(tools_renderer: ChatRenderer) -> None:
    messages = [{"role": "user", "content": "Hi."}]
    chat_line = parse_record(json.dumps({"session_id": 42, "messages": messages}), 8)
    responses_line = parse_record(
        json.dumps({"session_id": 43, "metadata": {"session_id": 43}, "input": "Hi."}), 9
    )
    assert (chat_line.session_id, responses_line.session_id) == ("42", "43")
    plain = tools_renderer.render(chat(messages)).token_ids
    # vLLM's own session_id (a string) and Responses metadata (strings) are the log's bookkeeping:
    # the bodies render, to the tokens they have without them
    assert tools_renderer.render(chat_line).token_ids == plain
    assert tools_renderer.render(responses_line).token_ids == plain


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"input": [{"type": "item_reference", "id": "msg_0"}]},
            "Unsupported input item type: item_reference",
        ),
        ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]}, "Encrypted content"),
        (
            {"input": "Hi.", "tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}},
            "not found in 'tools'",
        ),
        ({"input": "Hi.", "cache_salt": ""}, "'cache_salt' must be a non-empty string"),
    ],
)
def test_what_vllm_refuses_is_one_error_naming_the_line(
    tools_renderer: ChatRenderer, body: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError) as info:
        tools_renderer.render(parse_record(json.dumps(body), 6))
    assert str(info.value).startswith("line 6: vLLM refuses this body: ")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_chain_is_written_out_for_a_server_without_the_logs_responses(tools_renderer: ChatRenderer) -> None:
    first = parse_record(
        json.dumps(
            {
                "request": {
                    "instructions": INSTRUCTIONS,
                    "input": [{"role": "system", "content": "S"}, {"role": "user", "content": "One."}],
                },
                "response": response("resp_w1", text_item("A.")),
            }
        ),
        1,
    )
    earlier = {"resp_w1": first}
    second = parse_record(
        json.dumps({"input": "Two.", "previous_response_id": "resp_w1"}), 2, earlier=earlier
    )
    rendered = explain_requests([first, second], tools_renderer, 32)
    body = tools_renderer.standalone_body(second, rendered[1].token_ids)
    assert body == {
        "input": [
            {"role": "user", "content": "One."},
            {"role": "assistant", "content": "A."},
            {"role": "user", "content": "Two."},
        ]
    }
    # A function_call right after the earlier reply: vLLM keeps the reply and the call apart in
    # the chain, but merges them in one input list; no body renders the same: None.
    third = parse_record(
        json.dumps(
            {"input": [call_item("c", "read_file", {"path": "a"})], "previous_response_id": "resp_w1"}
        ),
        3,
        earlier=earlier,
    )
    assert tools_renderer.standalone_body(third, tools_renderer.render(third).token_ids) is None


# --------------------------------------------------------------------------- a real server


def record_responses_log(server: ServerProcess, path: Path) -> Path:
    """An agent on the Responses API, recorded with the official SDK the way a proxy writes it:
    ``{"session_id", "timestamp", "url", "request", "response"}``, the response the final object.

    Session ``items`` keeps its own history as input items (instructions, tools, a function call
    round trip, the model's replies as output items); session ``chain`` sends only the new input
    with ``previous_response_id``, ending with the client's function call and its output (vLLM keeps
    the call apart from the reply before it: no self-contained body renders that request the same,
    so its replay sends its token IDs)."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=server.api_key)
    model = client.models.list().data[0].id
    out = path.open("w")
    instructions = INSTRUCTIONS + " Keep the diff small and explain each step before the call." * 3

    def call(session: str, **body: Any) -> Any:
        body = {"model": model, "max_output_tokens": 12, "temperature": 0, **body}
        reply = client.responses.create(**body)
        record = {"session_id": session, "timestamp": time.time(), "url": server.url + "/v1/responses"}
        out.write(json.dumps(record | {"request": body, "response": reply.model_dump()}) + "\n")
        return reply

    items: list[dict[str, Any]] = [{"role": "user", "content": "Fix the rounding bug in money.py."}]
    first = call("items", instructions=instructions, input=items, tools=FLAT_TOOLS, tool_choice="auto")
    items += [item.model_dump(exclude_none=True) for item in first.output]
    items += [
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "read_file",
            "arguments": '{"path": "money.py"}',
        },
        {
            "type": "function_call_output",
            "call_id": "call_1",
            "output": "def round_amount(x):\n    return int(x)",
        },
    ]
    second = call("items", instructions=instructions, input=items, tools=FLAT_TOOLS, tool_choice="auto")
    items += [item.model_dump(exclude_none=True) for item in second.output]
    items.append(
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Run the tests."}]}
    )
    call("items", instructions=instructions, input=items, tools=FLAT_TOOLS, tool_choice="auto")

    one = call("chain", instructions=instructions, input="What does money.py do?", tools=FLAT_TOOLS)
    two = call(
        "chain",
        instructions=instructions,
        input="Where is it tested?",
        previous_response_id=one.id,
        tools=FLAT_TOOLS,
    )
    output = [
        {
            "type": "function_call",
            "call_id": "call_9",
            "name": "run_tests",
            "arguments": '{"target": "money"}',
        },
        {"type": "function_call_output", "call_id": "call_9", "output": "tests/test_money.py: 3 passed"},
    ]
    call("chain", instructions=instructions, input=output, previous_response_id=two.id, tools=FLAT_TOOLS)
    out.close()
    return path


@pytest.mark.engine
def test_a_responses_log_from_a_real_server_is_explained_exactly(
    vllm_server: ServerProcess, tools_renderer: ChatRenderer, tmp_path: Path
) -> None:
    log = record_responses_log(vllm_server, tmp_path / "responses.jsonl")
    requests, skipped = read_requests(log)
    assert not skipped and len(requests) == 6 and {r.format for r in requests} == {RESPONSES}
    assert [r.previous.line if r.previous else None for r in requests] == [None, None, None, None, 4, 5]
    explained = explain_requests(requests, tools_renderer, 32)  # the session server's block size
    for request, e in zip(requests, explained, strict=True):
        assert request.response is not None and request.response.usage is not None
        usage = request.response.usage
        assert (e.prompt_tokens, e.predicted_cached_tokens) == (usage.prompt_tokens, usage.cached_tokens), (
            e.line
        )
    assert sum(e.predicted_cached_tokens for e in explained) > 0
    # the chain reuses its history
    assert explained[4].predicted_cached_tokens > explained[3].prompt_tokens // 2
    # the replay's two ways for a chained request: written out as one body, or its token IDs
    assert tools_renderer.standalone_body(requests[4], explained[4].token_ids) is not None
    assert tools_renderer.standalone_body(requests[5], explained[5].token_ids) is None

    # The server renders the bodies itself on the replay (a fresh cache_salt; the chain written
    # out as input items, since that server knows none of the log's responses) and agrees.
    out = tmp_path / "explain.json"
    command = ["-m", "harness.explain", str(log), "--chat-template", str(TOOLS_TEMPLATE)]
    env = {"OPENAI_API_KEY": vllm_server.api_key, "VLLM_API_KEY": vllm_server.api_key}
    proc = run_script(*command, "--endpoint", vllm_server.url, "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    document = json.loads(out.read_text())
    validate("explain", document)
    for row, e in zip(document["requests"], explained, strict=True):
        assert row["format"] == "responses"
        assert row["agrees_with_reported"] is True, row["line"]
        assert row["engine_prompt_tokens"] == row["prompt_tokens"] == e.prompt_tokens, row["line"]
        assert row["engine_cached_tokens"] == row["predicted_cached_tokens"] == e.predicted_cached_tokens, (
            row["line"]
        )
    assert "the engine agrees with the prediction on all 6 requests" in proc.stdout
