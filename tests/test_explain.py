"""The cache-break explainer: exact token indices, cache predictions, hints, and the CLI's errors.

Expected token counts are worked out by hand from the ChatML layout (every message is
``<|im_start|>`` + ``role\\ncontent`` + ``<|im_end|>`` + ``\\n``; the generation prompt is
``<|im_start|>`` + ``assistant\\n``) and the tokenizer's own ``encode``, never from the functions
under test. No engine starts here (the rendering is vLLM's, without an engine); ``verify`` is
tested against a fake replay, and against the real engine in tests/test_explain_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import TOOLS, TOOLS_TEMPLATE, agent_turns, tool, validate

from harness.errors import UserError
from harness.explain import (
    SESSION,
    ChatRequest,
    check_json_target,
    detect_hint,
    explain_requests,
    parse_record,
    read_requests,
)
from harness.explain.analyze import RequestExplanation
from harness.explain.render import ChatRenderer
from harness.explain.verify import Sent, salt_for, verify

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "agent_trace.jsonl"

SYSTEM = "You are a careful test agent. Follow the rules. Clock: 09:30:"
LATER_TEXT = " UTC. Answer in one short sentence, and never invent facts you cannot check."

Message = dict[str, Any]


def message_tokens(tok: ChatRenderer, role: str, content: str) -> int:
    """Tokens one ChatML message takes: <|im_start|>, role\\ncontent, <|im_end|>, \\n."""
    return 1 + len(tok.encode(f"{role}\n{content}")) + 1 + 1


def generation_prompt_tokens(tok: ChatRenderer) -> int:
    return 1 + len(tok.encode("assistant\n"))


def cached_by_rule(prompt_len: int, common: int, block: int) -> int:
    """vLLM's rule written out again, independent of harness.prefix."""
    return block * (min(common, prompt_len - 1) // block)


def req(line: int, messages: list[Message], session: str | None = None, **body: Any) -> ChatRequest:
    return ChatRequest(line, {"messages": messages, **body}, "openai", session)


def sys_msg(seconds: str) -> Message:
    return {"role": "system", "content": f"{SYSTEM}{seconds}{LATER_TEXT}"}


def explain(
    tok: ChatRenderer, requests: Sequence[ChatRequest], block: int, scope: str = SESSION
) -> list[RequestExplanation]:
    return explain_requests(requests, tok, block, scope=scope)


# --------------------------------------------------------------------------- token spans


def test_message_boundaries_match_chatml_layout(chat_renderer: ChatRenderer) -> None:
    tok = chat_renderer
    messages = [
        sys_msg("05"),
        {"role": "user", "content": "List the files you changed."},
        {"role": "assistant", "content": "money.py and CHANGELOG.md"},
        {"role": "user", "content": "Thanks. Now run the tests."},
    ]
    sizes = [message_tokens(tok, m["role"], m["content"]) for m in messages]
    expected, start = [], 0
    for size in sizes:
        expected.append((start, start + size))
        start += size
    rendered = tok.render_messages(messages)
    assert len(rendered.token_ids) == start + generation_prompt_tokens(tok)
    for k, (first, end) in enumerate(expected):
        assert tok.message_at(rendered, first) == k
        assert tok.message_at(rendered, end - 1) == k
    assert tok.message_at(rendered, start) is None  # the generation prompt
    assert tok.message_at(rendered, len(rendered.token_ids) - 1) is None


# --------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("block", [8, 32])
def test_timestamp_break_exact_index_and_cache(chat_renderer: ChatRenderer, block: int) -> None:
    tok = chat_renderer
    user = {"role": "user", "content": "What changed in the billing service?"}
    first = [sys_msg("05"), user]
    second = [sys_msg("17"), user]
    # The seconds differ in their first digit ("0" vs "1"); digits are one token each, so the
    # shared prefix is <|im_start|> plus the tokens of "system\n" + SYSTEM.
    index = 1 + len(tok.encode("system\n" + SYSTEM))
    assert tok.encode("system\n" + SYSTEM) == tok.encode(f"system\n{SYSTEM}17{LATER_TEXT}")[: index - 1]
    len_first = (
        message_tokens(tok, "system", first[0]["content"])
        + message_tokens(tok, "user", user["content"])
        + generation_prompt_tokens(tok)
    )
    len_second = len_first  # same digit count

    out = explain(tok, [req(1, first), req(2, second)], block)
    assert [e.status for e in out] == ["cold", "break"]
    assert out[0].predicted_cached_tokens == 0
    e = out[1]
    assert e.prompt_tokens == len_second
    assert e.first_divergence == index
    assert e.message_index == 0 and e.role == "system"
    assert e.reference_line == 1
    assert e.predicted_cached_tokens == cached_by_rule(len_second, index, block)
    assert e.predicted_cached_tokens == block * (index // block)
    assert e.lost_tokens == cached_by_rule(len_second, len_first, block) - block * (index // block)
    assert e.divergence is not None
    assert (e.divergence.token, e.divergence.previous_token) == ("1", "0")
    assert e.divergence.before.endswith("09:30:")
    assert e.divergence.after.startswith("7 UTC.")
    assert e.hint is not None and e.hint.kind == "timestamp"


def test_break_in_a_later_message_names_it(chat_renderer: ChatRenderer) -> None:
    tok = chat_renderer
    block = 16
    head = [
        sys_msg("05"),
        {"role": "user", "content": "Summarize the incident."},
        {"role": "assistant", "content": "The nightly build failed."},
    ]
    before = "Please check the parser"
    first = [*head, {"role": "user", "content": before + " module first."}]
    second = [*head, {"role": "user", "content": before + " tests first."}]
    head_tokens = sum(message_tokens(tok, m["role"], m["content"]) for m in head)
    index = head_tokens + 1 + len(tok.encode("user\n" + before))
    assert tok.encode("user\n" + before + " module")[:-1] == tok.encode("user\n" + before)

    out = explain(tok, [req(1, first), req(2, second)], block)
    e = out[1]
    assert e.status == "break"
    assert e.first_divergence == index
    assert (e.message_index, e.role) == (3, "user")
    assert e.predicted_cached_tokens == block * (index // block)
    assert e.divergence is not None
    assert (e.divergence.token, e.divergence.previous_token) == (" tests", " module")
    assert e.hint is None  # an ordinary change of words


def test_append_only_turn_extends_with_nothing_lost(chat_renderer: ChatRenderer) -> None:
    tok = chat_renderer
    block = 32
    first = [sys_msg("05"), {"role": "user", "content": "Read money.py."}]
    second = [
        *first,
        {"role": "assistant", "content": '{"tool": "read_file"}'},
        {"role": "user", "content": "Tool result: 14 lines."},
    ]
    len_first = sum(message_tokens(tok, m["role"], m["content"]) for m in first) + generation_prompt_tokens(
        tok
    )
    len_second = sum(message_tokens(tok, m["role"], m["content"]) for m in second) + generation_prompt_tokens(
        tok
    )
    out = explain(tok, [req(1, first), req(2, second)], block)
    e = out[1]
    assert e.status == "extends"
    assert e.prompt_tokens == len_second
    # The first prompt's generation prompt is the second's assistant header: all of it is shared.
    assert e.first_divergence == len_first
    assert (e.message_index, e.role) == (2, "assistant")
    assert e.predicted_cached_tokens == block * (len_first // block)
    assert e.lost_tokens == 0
    assert e.hint is None


def test_new_user_turn_after_generation_prompt_breaks_at_role(chat_renderer: ChatRenderer) -> None:
    tok = chat_renderer
    first = [sys_msg("05"), {"role": "user", "content": "Hello."}]
    second = [*first, {"role": "user", "content": "Are you there?"}]
    conversation = sum(message_tokens(tok, m["role"], m["content"]) for m in first)
    out = explain(tok, [req(1, first), req(2, second)], 8)
    e = out[1]
    # Both have <|im_start|> there; then "user" where the first had its generation prompt.
    assert e.status == "break"
    assert e.first_divergence == conversation + 1
    assert (e.message_index, e.role) == (2, "user")
    assert e.divergence is not None and e.divergence.token == "user"
    assert e.divergence.previous_token != "user"


def test_repeat_is_served_up_to_the_last_block(chat_renderer: ChatRenderer) -> None:
    tok = chat_renderer
    messages = [sys_msg("05"), {"role": "user", "content": "Once more."}]
    length = sum(message_tokens(tok, m["role"], m["content"]) for m in messages) + generation_prompt_tokens(
        tok
    )
    out = explain(tok, [req(1, messages), req(2, messages)], 32)
    e = out[1]
    assert e.status == "repeat"
    assert e.first_divergence == length
    assert e.predicted_cached_tokens == 32 * ((length - 1) // 32)
    assert e.message_index is None and e.divergence is None
    assert e.lost_tokens == 0


def test_sessions_are_isolated_in_session_scope(chat_renderer: ChatRenderer) -> None:
    tok = chat_renderer
    messages = [sys_msg("05"), {"role": "user", "content": "Status?"}]
    length = len(tok.render_messages(messages).token_ids)
    requests = [
        req(1, messages, "a"),
        req(2, messages, "b"),  # same prompt, other session: cold
        req(3, messages, "a"),
        req(4, messages),  # the default session is a session of its own
        req(5, messages),
    ]
    out = explain(tok, requests, 16, scope="session")
    assert [e.status for e in out] == ["cold", "cold", "repeat", "cold", "repeat"]
    hit = 16 * ((length - 1) // 16)
    assert [e.predicted_cached_tokens for e in out] == [0, 0, hit, 0, hit]
    assert [e.reference_line for e in out] == [None, None, 1, None, 4]


def test_sessions_share_blocks_in_shared_scope(chat_renderer: ChatRenderer) -> None:
    """One vLLM server without salts: a second session reuses the first one's system prompt;
    a body's own cache_salt still keeps its request apart, as vLLM does."""
    tok = chat_renderer
    system = sys_msg("05")
    a = [system, {"role": "user", "content": "Status of the build?"}]
    b = [system, {"role": "user", "content": "Who owns billing?"}]
    shared = 1 + len(tok.encode(f"system\n{system['content']}")) + 1 + 1 + 1 + len(tok.encode("user\n"))
    requests = [req(1, a, "a"), req(2, b, "b"), req(3, b, "c", cache_salt="tenant-c")]
    out = explain(tok, requests, 16, scope="shared")
    length_b = len(tok.render_messages(b).token_ids)
    assert [e.status for e in out] == ["cold", "cold", "cold"]  # each is its session's first
    assert out[1].predicted_cached_tokens == cached_by_rule(length_b, shared, 16) > 0
    assert out[1].cached_from_line == 1
    assert out[2].predicted_cached_tokens == 0 and out[2].cached_from_line is None
    assert [e.predicted_cached_tokens for e in explain(tok, requests, 16, scope="session")] == [0, 0, 0]


def test_reference_is_the_most_recent_prompt_sharing_the_prefix(chat_renderer: ChatRenderer) -> None:
    user = {"role": "user", "content": "Go."}
    requests = [
        req(1, [sys_msg("05"), user]),
        req(2, [sys_msg("06"), user]),
        req(3, [sys_msg("07"), user]),
    ]
    out = explain(chat_renderer, requests, 32)
    # All three share the same prefix up to the seconds; line 3 is compared with line 2.
    assert out[2].reference_line == 2
    assert out[2].divergence is not None and out[2].divergence.previous_token == "6"
    assert out[2].hint is not None and out[2].hint.kind == "timestamp"


def test_example_trace_shows_each_kind_of_break(chat_renderer: ChatRenderer) -> None:
    requests, skipped = read_requests(EXAMPLE)
    assert skipped == [] and 5 <= len(requests) <= 7
    out = explain(chat_renderer, requests, 32)
    assert [e.status for e in out] == ["cold", "extends", "cold", "break", "extends", "break", "break"]
    assert [e.hint.kind if e.hint else None for e in out] == [
        None,
        None,
        None,
        "timestamp",
        None,
        "json_key_order",
        "uuid",
    ]
    assert [e.message_index for e in out if e.is_break] == [0, 1, 0]
    for e in out:
        assert e.predicted_cached_tokens == cached_by_rule(e.prompt_tokens, e.first_divergence, 32)
        if e.status == "extends":
            assert e.predicted_cached_tokens / e.prompt_tokens > 0.8
    # The system prompt is a few hundred tokens and the timestamp sits near its top.
    assert out[3].first_divergence < 128 < out[3].lost_tokens


# --------------------------------------------------------------------------- tools and replies


def server_conversation(messages: list[Message]) -> list[Message]:
    """What vLLM 0.32's OpenAI server hands the chat template, written out by hand: text parts
    joined with a newline, null content as "", tool-call arguments parsed into objects."""
    out: list[Message] = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            c = "\n".join(p["text"] for p in c)
        conv: Message = {"role": m["role"], "content": c if c is not None else ""}
        if m.get("tool_calls"):
            conv["tool_calls"] = [
                {
                    "id": t["id"],
                    "type": "function",
                    "function": {
                        "name": t["function"]["name"],
                        "arguments": json.loads(t["function"]["arguments"]),
                    },
                }
                for t in m["tool_calls"]
            ]
        for key in ("tool_call_id", "name"):
            if key in m:
                conv[key] = m[key]
        out.append(conv)
    return out


def server_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``tool.model_dump()``: vLLM's tool model fills the fields a body left out with null."""
    return [
        {
            "type": "function",
            "function": {**t["function"], "strict": None}
            if "strict" in t["function"]
            else {
                "name": t["function"]["name"],
                "description": t["function"].get("description"),
                "parameters": t["function"].get("parameters"),
            },
        }
        for t in tools
    ]


def test_tools_and_tool_calls_render_as_the_server_renders_them(tools_renderer: ChatRenderer) -> None:
    from transformers import AutoTokenizer

    messages = agent_turns()
    rendered = tools_renderer.render(req(1, messages, tools=TOOLS))
    hf = AutoTokenizer.from_pretrained(tools_renderer.model_config.model)
    expected = hf.apply_chat_template(
        server_conversation(messages),
        tools=server_tools(TOOLS),
        chat_template=TOOLS_TEMPLATE.read_text(),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert rendered.token_ids == [int(t) for t in expected]
    assert "<tools>" in rendered.text and '"read_file"' in rendered.text
    assert '<tool_call>\n{"name": "read_file", "arguments": {"path": "money.py"}}' in rendered.text
    # The tool list makes the prompt several times longer than its messages alone.
    plain = tools_renderer.render(req(1, messages))
    assert len(rendered.token_ids) > len(plain.token_ids) + 150


def test_reordered_tool_list_breaks_in_the_system_message(tools_renderer: ChatRenderer) -> None:
    tok, block = tools_renderer, 32
    messages = agent_turns()
    first = tok.render(req(1, messages[:2], tools=TOOLS)).token_ids
    moved = [TOOLS[1], TOOLS[0], TOOLS[2]]
    second = tok.render(req(2, messages, tools=moved)).token_ids
    index = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    out = explain(tok, [req(1, messages[:2], tools=TOOLS), req(2, messages, tools=moved)], block)
    e = out[1]
    assert e.status == "break"
    assert e.first_divergence == index
    assert (e.message_index, e.role) == (0, "system")
    assert e.predicted_cached_tokens == block * (index // block)
    assert e.lost_tokens == cached_by_rule(len(second), len(first), block) - block * (index // block)
    assert e.hint is not None and e.hint.kind == "tools_reordered"
    assert "read_file" in e.hint.old and "run_tests" in e.hint.new
    # The same history with the tools in their first order extends append-only.
    same = explain(tok, [req(1, messages[:2], tools=TOOLS), req(2, messages, tools=TOOLS)], block)[1]
    assert same.status == "extends" and same.lost_tokens == 0


def test_tool_schema_change_and_added_tool_are_named(tools_renderer: ChatRenderer) -> None:
    messages = agent_turns()
    changed = [TOOLS[0], tool("run_tests", "Run the test suite (max 60 s).", target="string"), TOOLS[2]]
    out = explain(tools_renderer, [req(1, messages, tools=TOOLS), req(2, messages, tools=changed)], 32)
    assert out[1].hint is not None and out[1].hint.kind == "tool_schema_changed"
    assert out[1].hint.old.startswith("run_tests")
    added = [*TOOLS[:1], tool("git_diff", "Show the diff."), *TOOLS[1:]]
    out = explain(tools_renderer, [req(1, messages, tools=TOOLS), req(2, messages, tools=added)], 32)
    assert out[1].hint is not None and out[1].hint.kind == "tools_changed"
    assert out[1].hint.new == "+git_diff"


def test_message_inserted_and_removed_mid_history(chat_renderer: ChatRenderer) -> None:
    base = [
        sys_msg("05"),
        {"role": "user", "content": "Plan the release."},
        {"role": "assistant", "content": "Step one: changelog."},
        {"role": "user", "content": "Go on."},
    ]
    inserted = [*base[:2], {"role": "user", "content": "Reminder: be brief."}, *base[2:]]
    out = explain(chat_renderer, [req(1, base), req(2, inserted)], 16)
    assert out[1].status == "break" and out[1].message_index == 2
    assert out[1].hint is not None and out[1].hint.kind == "message_inserted"
    removed = [base[0], *base[2:]]
    out = explain(chat_renderer, [req(1, base), req(2, removed)], 16)
    assert out[1].status == "break" and out[1].message_index == 1
    assert out[1].hint is not None and out[1].hint.kind == "message_removed"


def test_unicode_normalization_is_named_and_shown_in_whole_characters(chat_renderer: ChatRenderer) -> None:
    import unicodedata

    text = "Réunion de l'équipe à 10 h."
    first = [sys_msg("05"), {"role": "user", "content": unicodedata.normalize("NFC", text)}]
    second = [sys_msg("05"), {"role": "user", "content": unicodedata.normalize("NFD", text)}]
    e = explain(chat_renderer, [req(1, first), req(2, second)], 16)[1]
    assert e.status == "break" and e.hint is not None and e.hint.kind == "unicode_normalization"
    assert e.divergence is not None
    for shown in (e.divergence.token, e.divergence.previous_token, e.divergence.before, e.divergence.after):
        assert "\ufffd" not in shown
        assert not (shown and unicodedata.combining(shown[0]))  # no accent cut from its letter
    assert unicodedata.normalize("NFC", e.divergence.token).startswith(unicodedata.normalize("NFC", "Ré")[:1])


def anthropic_body(tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-x",
        "max_tokens": 256,
        "system": [
            {"type": "text", "text": "You are a coding agent. ", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Use the tools."},
        ],
        "messages": [
            {"role": "user", "content": "Fix the rounding bug."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Reading the file."},
                    {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "money.py"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "def round_amount(x): ..."}
                ],
            },
        ],
    }
    if tools is not None:
        body["tools"] = [
            {
                "name": t["function"]["name"],
                "description": t["function"]["description"],
                "input_schema": t["function"]["parameters"],
            }
            for t in tools
        ]
    return body


def test_anthropic_body_renders_through_vllms_messages_conversion(tools_renderer: ChatRenderer) -> None:
    body = anthropic_body(TOOLS)
    request = parse_record(json.dumps(body), 1)
    assert request.format == "anthropic"
    rendered = tools_renderer.render(request)
    # vLLM's /v1/messages conversion, written out: system blocks joined, tool_use as a tool call
    # with its input as JSON arguments, tool_result as a tool message.
    openai_body = {
        "messages": [
            {"role": "system", "content": "You are a coding agent. Use the tools."},
            {"role": "user", "content": "Fix the rounding bug."},
            {
                "role": "assistant",
                "content": "Reading the file.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": '{"path": "money.py"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "def round_amount(x): ..."},
        ],
        "tools": TOOLS,
    }
    same = tools_renderer.render(parse_record(json.dumps(openai_body), 2))
    assert rendered.token_ids == same.token_ids


def with_response(messages: list[Message], content: str, usage: dict[str, Any] | None = None) -> str:
    response: dict[str, Any] = {
        "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
    }
    if usage is not None:
        response["usage"] = usage
    return json.dumps({"request": {"messages": messages}, "response": response})


def test_a_logged_reply_enters_the_cache(chat_renderer: ChatRenderer) -> None:
    tok, block = chat_renderer, 8
    first = [sys_msg("05"), {"role": "user", "content": "Which file rounds amounts?"}]
    reply = "money.py rounds them in round_amount."
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Fix it."}]
    len_first = len(tok.render_messages(first).token_ids)
    len_second = len(tok.render_messages(second).token_ids)
    # The engine computed the prompt and the reply's tokens but the last (the end of turn).
    shared = len_first + len(tok.encode(reply))
    requests = [parse_record(with_response(first, reply), 1), req(2, second)]
    out = explain(tok, requests, block)
    assert out[0].reply_tokens == len(tok.encode(reply)) and out[0].reply_tokens_source == "rendered"
    assert out[1].status == "extends"
    assert out[1].first_divergence == shared
    assert out[1].predicted_cached_tokens == cached_by_rule(len_second, shared, block)
    # Without the reply in the log, only the prompt is known to be cached.
    bare = explain(tok, [req(1, first), req(2, second)], block)[1]
    assert bare.predicted_cached_tokens == cached_by_rule(len_second, len_first, block)
    assert out[1].predicted_cached_tokens > bare.predicted_cached_tokens


def test_reported_usage_is_reconciled_with_causes(chat_renderer: ChatRenderer) -> None:
    tok, block = chat_renderer, 16
    system = {"role": "system", "content": sys_msg("05")["content"] + " Keep every answer short." * 20}
    a = [system, {"role": "user", "content": "Status of the build, please?"}]
    b = [system, {"role": "user", "content": "Who owns the billing service?"}]
    len_b = len(tok.render_messages(b).token_ids)
    shared_prefix = (
        len(tok.render_messages([system]).token_ids)
        - generation_prompt_tokens(tok)
        + 1
        + len(tok.encode("user\n"))
    )
    predicted = cached_by_rule(len_b, shared_prefix, block)

    def line(
        n: int, messages: list[Message], session: str, cached: int, prompt: int | None = None
    ) -> ChatRequest:
        usage = {
            "prompt_tokens": prompt if prompt is not None else len(tok.render_messages(messages).token_ids),
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        record = json.loads(with_response(messages, "ok", usage))
        record["session_id"] = session
        return parse_record(json.dumps(record), n)

    assert shared_prefix % 32 >= 16  # so block sizes 16 and 32 cut it at different places
    cases = [
        (predicted, True, None),
        (0, False, "cache scope"),  # the session scope predicts 0 for a new session
        (cached_by_rule(len_b, shared_prefix, 32), False, "block size 32"),
        (predicted + 16, False, "more served"),
    ]
    for reported, agrees, cause in cases:
        out = explain(tok, [line(1, a, "s1", 0), line(2, b, "s2", reported)], block, scope="shared")
        r = out[1].reconciliation
        assert r is not None and out[1].predicted_cached_tokens == predicted
        assert (r.agrees, r.cause) == (agrees, cause), reported
    out = explain(tok, [line(1, a, "s1", 0), line(2, b, "s2", predicted, prompt=len_b + 3)], block)
    assert out[1].reconciliation is not None and out[1].reconciliation.cause == "rendered differently"
    # In session scope the same 0 is simply right, and a full hit means the server shares blocks.
    out = explain(tok, [line(1, a, "s1", 0), line(2, b, "s2", predicted)], block, scope="session")
    assert out[1].reconciliation is not None and out[1].reconciliation.cause == "cache scope"


# --------------------------------------------------------------------------- hints


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        (
            "Now: 2026-11-27 09:30:05 UTC. Be brief.",
            "Now: 2026-11-27 09:31:12 UTC. Be brief.",
            "timestamp",
        ),
        ("It is 14:05 here.", "It is 14:09 here.", "timestamp"),
        ("epoch=1795772405 ok", "epoch=1795772466 ok", "timestamp"),
        ("Today is 2026-11-27.", "Today is 2026-11-28.", "date"),
        ("Today is Friday, be nice.", "Today is Saturday, be nice.", "date"),
        (
            "request 3f2c9a1e-7b4d-4c2a-9e51-0d8f6b2a4c17 open",
            "request 9d41c7e2-05ab-4f3e-8c6d-2e7f1a9b3c58 open",
            "uuid",
        ),
        ("Turn 7 of this session.", "Turn 8 of this session.", "counter"),
        (
            'State: {"a": 1, "b": {"c": 2, "d": 3}} end',
            'State: {"b": {"d": 3, "c": 2}, "a": 1} end',
            "json_key_order",
        ),
        ('{"x": 1, "y": [1, 2]}', '{"y": [1, 2], "x": 1}', "json_key_order"),
        ('{"step": 3, "goal": "fix"}', '{"goal": "fix", "step": 4}', "json_key_order"),
        ('state {"a": 1, "b": 2}', 'state {"a":1,"b":2}', "json_serialization"),
        ("Café ouvert.", "Cafe\u0301 ouvert.", "unicode_normalization"),
    ],
)
def test_hint_fires(old: str, new: str, kind: str) -> None:
    hint = detect_hint(old, new)
    assert hint is not None and hint.kind == kind


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Fix the bug in the parser module.", "Fix the bug in the lexer module."),
        ("At 09:30 fix the parser.", "At 09:30 fix the lexer."),  # a time nearby, not changed
        ('Call {"tool": "read"} now', 'Call {"tool": "edit"} now'),  # JSON with a changed value
        ("version 3.91 released", "version 4.07 released"),  # a decimal is not a counter
        ("same text", "same text"),
    ],
)
def test_hint_stays_quiet(old: str, new: str) -> None:
    assert detect_hint(old, new) is None


# --------------------------------------------------------------------------- parsing


def test_parse_accepts_openai_bodies() -> None:
    line = json.dumps(
        {
            "model": "x",
            "max_tokens": 5,
            "session_id": 7,
            "messages": [{"role": "user", "content": "hi", "name": "dana"}],
        }
    )
    request = parse_record(line, 4)
    assert (request.line, request.session_id, request.format) == (4, "7", "openai")
    # the name is kept: some chat templates render it, and vLLM passes it on
    assert request.messages == [{"role": "user", "content": "hi", "name": "dana"}]


@pytest.mark.parametrize(
    ("record", "fmt", "session", "has_response"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "openai", None, False),
        (
            {"system": "S", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            "anthropic",
            None,
            False,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}
                ]
            },
            "anthropic",
            None,
            False,
        ),
        (
            {
                "request": {"messages": [{"role": "user", "content": "hi"}]},
                "response": {"choices": [{"message": {"role": "assistant", "content": "yo"}}]},
                "session_id": "s",
            },
            "openai",
            "s",
            True,
        ),
        (
            {
                "custom_id": "r1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "hi"}], "metadata": {"session_id": "m"}},
            },
            "openai",
            "m",
            False,
        ),
        (
            {
                "custom_id": "r2",
                "params": {"max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]},
                "url": "/v1/messages",
            },
            "anthropic",
            None,
            False,
        ),
        (
            {
                "reqPayload": json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                "respPayload": json.dumps({"choices": [{"message": {"role": "assistant", "content": "yo"}}]}),
                "requestedAt": 1795772405123,
            },
            "openai",
            None,
            True,
        ),
        (
            {
                "providerRequest": {
                    "url": "x",
                    "json": {"messages": [{"role": "developer", "content": "d"}]},
                },
                "providerResponse": {
                    "json": {"content": [{"type": "text", "text": "yo"}], "type": "message"}
                },
            },
            "openai",
            None,
            True,
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "response": {"choices": []},
                "metadata": {"session_id": 3},
            },
            "openai",
            "3",
            False,
        ),
    ],
)
def test_parse_reads_the_shapes_logs_come_in(
    record: dict[str, Any], fmt: str, session: str | None, has_response: bool
) -> None:
    request = parse_record(json.dumps(record), 1)
    assert request.format == fmt
    assert request.session_id == session
    assert (request.response is not None) == has_response
    assert request.messages[0]["content"] in ("hi", "d") or request.format == "anthropic"


def test_parse_reads_usage_and_timestamps() -> None:
    record = {
        "timestamp": "2026-11-28T10:00:05Z",
        "request": {"max_tokens": 9, "system": "S", "messages": [{"role": "user", "content": "hi"}]},
        "response": {
            "type": "message",
            "content": [{"type": "text", "text": "yo"}],
            "stop_reason": "end_turn",
            "usage": {
                "input_tokens": 7,
                "cache_read_input_tokens": 64,
                "cache_creation_input_tokens": 32,
                "output_tokens": 3,
            },
        },
    }
    request = parse_record(json.dumps(record), 1)
    assert request.timestamp == 1795860005.0
    assert request.response is not None and request.response.finish_reason == "stop"
    usage = request.response.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.output_tokens) == (
        103,
        64,
        32,
        3,
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "hi"}', 'no "messages" list'),
        ('{"input": ["hi"], "model": "gpt"}', "input item 0 is not an object"),
        ('{"messages": []}', '"messages" is empty'),
        ('{"messages": [{"content": "hi"}]}', 'message 0 has no "role" string'),
        ('{"messages": [{"role": "user", "content": ["a"]}]}', 'message 0 (user) has no "content"'),
        ('{"messages": [{"role": "user", "content": 5}]}', 'message 0 (user) has no "content"'),
        ('{"messages": [{"role": "user"}]}', 'message 0 (user) has no "content"'),
        ('{"messages": [{"role": "user", "content": "a"}], "session_id": [1]}', '"session_id"'),
        ('{"messages": [{"role": "user", "content": "a"}], "tools": "x"}', '"tools"'),
    ],
)
def test_parse_rejects_malformed_lines(text: str, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        parse_record(text, 9)
    assert str(info.value).startswith("line 9: ")
    assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_a_body_vllm_refuses_is_one_error_naming_the_line(chat_renderer: ChatRenderer) -> None:
    bad = req(5, [{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {}}])
    with pytest.raises(UserError, match=r"^line 5: vLLM refuses this body: tools\.0\.function\.name"):
        chat_renderer.render(bad)


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hello there."}]})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run(
        [sys.executable, "-m", "harness.explain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize("bad", ['{"messages": [', '{"messages": "hi"}', '{"messages": [{"role": 1}]}'])
def test_cli_malformed_line_is_one_line_error(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{bad}\n{{also bad\n")
    result = run_cli(str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "line 2:" in lines[0] and "line 3" not in lines[0]  # stops at the first bad line
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_missing_file(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'nope.jsonl'}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--block-size", "0"), "error: --block-size must be a positive number of tokens, got 0"),
        (
            ("--chat-template", "/nonexistent/t.jinja"),
            "error: --chat-template /nonexistent/t.jinja: no such file",
        ),
        (("--endpoint", "http://127.0.0.1:9"), "error: cannot reach a vLLM server at http://127.0.0.1:9"),
    ],
)
def test_cli_bad_flags_fail_before_anything_slow(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text(GOOD + "\n")
    result = run_cli(str(path), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_cli_skip_bad_goes_on(tmp_path: Path, model_path: str) -> None:
    path = tmp_path / "mixed.jsonl"
    other = json.dumps({"messages": [{"role": "user", "content": "Hello there, again."}]})
    path.write_text(f"{GOOD}\n{{broken\n\n{other}\n")
    out = tmp_path / "out.json"
    result = run_cli(str(path), "--skip-bad", "--json", str(out), "--model", model_path)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "line 2:" in result.stderr
    assert "Traceback" not in result.stderr
    document = json.loads(out.read_text())
    validate("explain", document)
    assert document["tool"] == "harness.explain"
    assert [r["line"] for r in document["requests"]] == [1, 4]
    assert [s["line"] for s in document["skipped"]] == [2]
    assert document["block_size"] == 32
    assert document["scope"] == "shared"
    keys = {
        "line",
        "session_id",
        "prompt_tokens",
        "predicted_cached_tokens",
        "first_divergence",
        "message_index",
        "role",
        "before",
        "token",
        "after",
        "lost_tokens",
        "hint",
    }
    assert keys <= set(document["requests"][1])
    # Both prompts share the default system prompt and "Hello there" before they differ.
    assert document["requests"][1]["status"] == "break"
    assert document["requests"][1]["role"] == "user"
    assert "scope shared" in result.stdout


def test_json_target_guard(tmp_path: Path) -> None:
    check_json_target(tmp_path / "new.json")  # a new file is fine
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"tool": "harness.explain", "requests": []}))
    check_json_target(ours)  # an earlier result may be replaced
    for name, text in (("notes.txt", "my notes"), ("other.json", '{"example": "lesson1"}')):
        foreign = tmp_path / name
        foreign.write_text(text)
        with pytest.raises(UserError, match="refusing to overwrite"):
            check_json_target(foreign)
    with pytest.raises(UserError, match="does not exist"):
        check_json_target(tmp_path / "missing" / "out.json")


def test_cli_refuses_to_overwrite_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text(GOOD + "\n")
    foreign = tmp_path / "results.json"
    foreign.write_text('{"example": "stable_prefix_vs_timestamp"}')
    result = run_cli(str(path), "--json", str(foreign))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --json {foreign} exists and is not a harness.explain result")
    assert "refusing to overwrite" in result.stderr
    assert foreign.read_text() == '{"example": "stable_prefix_vs_timestamp"}'


def test_read_requests_empty_lines_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(f"\n{GOOD}\n\n")
    requests, skipped = read_requests(path)
    assert [r.line for r in requests] == [2] and skipped == []
    (tmp_path / "empty.jsonl").write_text("")
    result = run_cli(str(tmp_path / "empty.jsonl"))
    assert result.returncode == 2 and result.stderr.startswith("error: no requests in")


def test_skip_bad_skips_a_non_utf8_line_and_reads_on(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n" + GOOD.encode() + b"\n")
    requests, skipped = read_requests(path, skip_bad=True)
    assert [r.line for r in requests] == [1, 3]
    assert [s.line for s in skipped] == [2] and "not UTF-8" in skipped[0].error


# --------------------------------------------------------------------------- verify (plumbing)


class FakeReplay:
    """A replay whose "engine" applies the block rule per cache_salt over the token IDs it gets.

    It checks the plumbing of ``verify`` (reset once, the scope's salts, replies computed after
    their request), not vLLM: the engine-backed checks live with the session-wide engine fixture.
    """

    def __init__(self, block_size: int, skew: int = 0) -> None:
        self.block_size = block_size
        self.skew = skew  # tokens to add to every non-zero count (a lying engine)
        self.calls: list[tuple[str, str | None, int]] = []
        self._seen: dict[str, list[list[int]]] = {}

    def reset(self) -> None:
        self.calls.append(("reset", None, 0))
        self._seen.clear()

    def _run(self, ids: Sequence[int], salt: str) -> int:
        seen = self._seen.setdefault(salt, [])
        common = 0
        for earlier in seen:
            n = 0
            while n < min(len(ids), len(earlier)) and ids[n] == earlier[n]:
                n += 1
            common = max(common, n)
        seen.append(list(ids))
        return cached_by_rule(len(ids), common, self.block_size)

    def send(self, request: ChatRequest, prompt_ids: Sequence[int], salt: str) -> Sent:
        self.calls.append(("send", salt, len(prompt_ids)))
        cached = self._run(prompt_ids, salt)
        return Sent(len(prompt_ids), cached + (self.skew if cached else 0))

    def compute(self, token_ids: Sequence[int], salt: str) -> None:
        self.calls.append(("compute", salt, len(token_ids)))
        self._run(token_ids, salt)


def fake_requests() -> list[ChatRequest]:
    base = {"role": "system", "content": "S" * 40}
    ask = {"role": "user", "content": "q"}
    return [
        req(1, [base, ask], "a"),
        req(2, [base, ask], "b"),
        parse_record(
            json.dumps(
                {
                    "request": {"messages": [base, ask, {"role": "assistant", "content": "r"}, ask]},
                    "response": {
                        "choices": [
                            {"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}
                        ]
                    },
                    "session_id": "a",
                }
            ),
            3,
        ),
        req(4, [base, ask]),
        req(5, [base, ask]),
    ]


@pytest.mark.parametrize("scope", ["session", "shared"])
def test_verify_plumbing_with_a_fake_replay(chat_renderer: ChatRenderer, scope: str) -> None:
    requests = fake_requests()
    explained = explain(chat_renderer, requests, 4, scope=scope)
    replay = FakeReplay(block_size=4)
    rows = verify(requests, explained, replay, scope)
    assert [c[0] for c in replay.calls].count("reset") == 1 and replay.calls[0][0] == "reset"
    salts = [salt for kind, salt, _ in replay.calls if kind == "send"]
    run = salts[0].split("-session-")[0].split("-no-session")[0]
    if scope == "session":
        assert salts == [
            f"{run}-session-a",
            f"{run}-session-b",
            f"{run}-session-a",
            f"{run}-no-session",
            f"{run}-no-session",
        ]
    else:
        assert salts == [run] * 5
    # the reply of line 3 is computed right after it, under the same salt, without its last token
    kinds = [kind for kind, _, _ in replay.calls]
    assert kinds == ["reset", "send", "send", "send", "compute", "send", "send"]
    compute = replay.calls[4]
    assert compute[2] == explained[2].prompt_tokens + explained[2].reply_tokens
    assert all(r.matches for r in rows), [(r.predicted_cached_tokens, r.engine_cached_tokens) for r in rows]
    assert [r.line for r in rows] == [1, 2, 3, 4, 5]
    assert salt_for("run", "session", requests[3]) == "run-no-session"
    assert salt_for("run", "shared", req(9, [base_msg()], "x", cache_salt="t")) == "run-t"


def base_msg() -> Message:
    return {"role": "user", "content": "x"}


def test_verify_reports_a_disagreeing_engine(chat_renderer: ChatRenderer) -> None:
    requests = fake_requests()
    explained = explain(chat_renderer, requests, 4, scope="session")
    rows = verify(requests, explained, FakeReplay(block_size=4, skew=4), "session")
    assert [r.matches for r in rows] == [True, True, False, True, False]
