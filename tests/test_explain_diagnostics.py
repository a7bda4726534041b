"""The providers' own cache-miss diagnostics in a log, next to the explainer's finding; and a log
recorded from a hosted API held to that provider's simulation, not to the local vLLM rendering.

The records are shaped from the providers' documented examples (docs/providers.md, "Providers' own
diagnostics": Anthropic's cache-diagnostics guide, OpenAI's prompt-cache-diagnostics guide, read
2026-12-02 from stored copies) and validated by the official SDKs' own types (``anthropic``
``types.Message``, ``openai`` ``types.responses.Response``) before the explainer reads them. Their
usage numbers are not measured: no request here reached a provider (no network); they stand for
what Claude's tokenizer would count (the simulation's o200k counts times 1.1), which is what the
reconciliation's tolerance is for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic.types
import pytest
from conftest import run_script, validate
from openai.types.responses import Response

from harness.explain import ChatRequest, explain_requests, parse_record
from harness.explain.costs import provider_request, segments_of
from harness.explain.diagnostics import compare_diagnostics, read_diagnostics, summary
from harness.explain.formats import LoggedResponse
from harness.explain.origin import answered_by, reconcile_answered
from harness.explain.reconcile import reconcile_with_provider
from harness.explain.render import ChatRenderer
from harness.providers import load_table, simulate

ANTHROPIC_URL = "https://api.anthropic.com/v1/messages"
DOCUMENT = "\n".join(
    f"Section {i}: the refund policy allows returns within {i + 10} days." for i in range(60)
)
SYSTEM = f"You are an assistant working through a large document. <document>{DOCUMENT}</document>"
CLOCK = "Current time: 2026-12-02 10:14:09 UTC\n"


def tool(name: str) -> dict[str, Any]:
    return {"name": name, "description": f"{name} in the document", "input_schema": {"type": "object"}}


def message(mid: str, model: str, usage: dict[str, int], miss: dict[str, Any] | None) -> dict[str, Any]:
    """A Messages API response as the anthropic SDK types it (then dumped the way a logger writes it)."""
    response = anthropic.types.Message.model_validate(
        {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "Done."}],
            "model": model,
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"output_tokens": 2, **usage},
            "diagnostics": None if miss is None else {"cache_miss_reason": miss},
        }
    )
    return response.model_dump(mode="json")


def anthropic_session(url: str = ANTHROPIC_URL) -> list[str]:
    """Six turns of one agent on Anthropic's API with cache diagnostics on (the guide's opt-in:
    ``previous_message_id`` null on the first turn, the previous response's id after), top-level
    automatic caching; turn 3 interpolates a clock into the system prompt, turn 4 reorders the
    tools, turn 5 names a response Anthropic no longer has, turn 6 switches the model."""
    tools = [tool("search"), tool("quote"), tool("summarize")]
    plan = [
        # (model, system, tools, previous id, the provider's reason)
        ("claude-sonnet-5-5", SYSTEM, tools, None, None),
        ("claude-sonnet-5-5", SYSTEM, tools, "msg_1", None),
        (
            "claude-sonnet-5-5",
            CLOCK + SYSTEM,
            tools,
            "msg_2",
            {"type": "system_changed", "cache_missed_input_tokens": 1530},
        ),
        (
            "claude-sonnet-5-5",
            CLOCK + SYSTEM,
            tools[::-1],
            "msg_3",
            {"type": "tools_changed", "cache_missed_input_tokens": 1561},
        ),
        (
            "claude-sonnet-5-5",
            CLOCK + SYSTEM,
            tools[::-1],
            "msg_gone",
            {"type": "previous_message_not_found"},
        ),
        (
            "claude-opus-5-5",
            CLOCK + SYSTEM,
            tools[::-1],
            "msg_5",
            {"type": "model_changed", "cache_missed_input_tokens": 1602},
        ),
    ]
    history: list[dict[str, Any]] = [{"role": "user", "content": "Summarize section 1."}]
    records = []
    for turn, (model, system, turn_tools, previous, _) in enumerate(plan, 1):
        body = {
            "model": model,
            "max_tokens": 256,
            "cache_control": {"type": "ephemeral"},
            "system": system,
            "tools": turn_tools,
            "messages": [dict(m) for m in history],
            "diagnostics": {"previous_message_id": previous},
        }
        records.append(
            {"session_id": "doc-agent", "timestamp": 1_796_206_000 + 30 * turn, "url": url, "request": body}
        )
        history += [
            {"role": "assistant", "content": "Done."},
            {"role": "user", "content": f"Now section {turn + 1}."},
        ]
    usages = claude_usage([parse_record(json.dumps(r), n) for n, r in enumerate(records, 1)])
    for n, (record, usage, (model, *_, miss)) in enumerate(zip(records, usages, plan, strict=True), 1):
        record["response"] = message(f"msg_{n}", model, usage, miss)
    return [json.dumps(record) for record in records]


def claude_usage(requests: list[ChatRequest]) -> list[dict[str, int]]:
    """What Anthropic would report, shaped from the simulation of its own rules in "Claude tokens"
    (o200k counts x 1.1: its tokenizer is not available offline)."""
    table = load_table()
    out: dict[int, dict[str, int]] = {}
    for model in {r.body["model"] for r in requests}:
        same = [r for r in requests if r.body["model"] == model]
        simulated = simulate(
            f"anthropic:{model}",
            [provider_request(r, segments_of(r), automatic=False) for r in same],
            table,
        )
        for request, usage in zip(same, simulated, strict=True):
            read, written = round(usage.cached_tokens * 1.1), round(usage.cache_write_tokens * 1.1)
            out[request.line] = {
                "input_tokens": round(usage.prompt_tokens * 1.1) - read - written,
                "cache_read_input_tokens": read,
                "cache_creation_input_tokens": written,
            }
    return [out[r.line] for r in requests]


# --------------------------------------------------------------------------- reading them


def test_read_diagnostics_from_the_sdks_own_shapes() -> None:
    miss = read_diagnostics(
        message(
            "msg_9",
            "claude-sonnet-5-5",
            {"input_tokens": 5},
            {"type": "tools_changed", "cache_missed_input_tokens": 321},
        )
    )
    assert miss is not None
    assert (miss.provider, miss.outcome, miss.reason, miss.part, miss.missed_tokens, miss.response_id) == (
        "anthropic",
        "miss",
        "tools_changed",
        "tools",
        321,
        "msg_9",
    )
    unavailable = read_diagnostics(
        message("m", "claude-sonnet-5-5", {"input_tokens": 5}, {"type": "unavailable"})
    )
    assert unavailable is not None and (unavailable.outcome, unavailable.part) == ("unavailable", None)
    quiet = read_diagnostics(message("m", "claude-sonnet-5-5", {"input_tokens": 5}, None))
    assert quiet is not None and quiet.outcome is None and quiet.model == "claude-sonnet-5-5"
    pending = read_diagnostics({"id": "m", "diagnostics": {"cache_miss_reason": None}})
    assert pending is not None and pending.outcome == "pending"

    def openai_response(diagnosis: dict[str, Any]) -> dict[str, Any]:
        return Response.model_validate(
            {
                "id": "resp_2",
                "object": "response",
                "created_at": 1796206000,
                "model": "gpt-6.2-sol",
                "output": [],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "prompt_cache_diagnostics": diagnosis,
            }
        ).model_dump(mode="json")

    found = read_diagnostics(
        openai_response(
            {
                "type": "cache_miss",
                "reason": "input_changed",
                "cache_missed_tokens": 900,
                "comparison_reusable_tokens": 1200,
            }
        )
    )
    assert found is not None
    assert (found.provider, found.outcome, found.part, found.missed_tokens, found.reusable_tokens) == (
        "openai",
        "miss",
        "input",
        900,
        1200,
    )
    hit = read_diagnostics(openai_response({"type": "cache_hit"}))
    assert hit is not None and (hit.outcome, hit.part) == ("hit", "none")
    gone = read_diagnostics(openai_response({"type": "comparison_response_not_found"}))
    assert gone is not None and (gone.outcome, gone.part) == ("baseline_not_found", None)


def test_openai_guides_example_renamed_tool_agrees(chat_renderer: ChatRenderer) -> None:
    """The OpenAI guide's example: the same model, instructions and input twice, the function tool
    renamed get_time -> get_date, the second compared with the first (Responses API bodies)."""
    policy = "Support policy.\n" + "Refunds are accepted within 30 days of purchase.\n" * 60

    def body(name: str, compare: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": "gpt-6.2-sol",
            "instructions": policy,
            "input": "Reply with exactly OK.",
            "tools": [{"type": "function", "name": name}],
        }
        if compare:
            out["prompt_cache_options"] = {"comparison_response_id": compare}
        return out

    first_response = {"id": "resp_1", "model": "gpt-6.2-sol"}
    second_response = {
        "id": "resp_2",
        "model": "gpt-6.2-sol",
        "prompt_cache_diagnostics": {
            "type": "cache_miss",
            "reason": "tools_changed",
            "cache_missed_tokens": 1100,
        },
    }
    requests = [
        ChatRequest(
            1,
            body("get_time", None),
            "responses",
            "s",
            None,
            LoggedResponse({}, "stop", None, None, read_diagnostics(first_response)),
        ),
        ChatRequest(
            2,
            body("get_date", "resp_1"),
            "responses",
            "s",
            None,
            LoggedResponse({}, "stop", None, None, read_diagnostics(second_response)),
        ),
    ]
    # The local analysis needs chat messages: stand-ins with the same session, no reference.
    chats = [
        ChatRequest(r.line, {"messages": [{"role": "user", "content": "x"}]}, "openai", f"s{r.line}")
        for r in requests
    ]
    explained = explain_requests(chats, chat_renderer, 32)
    (diagnosis,) = compare_diagnostics(requests, explained, load_table(), lambda r: "openai:gpt-6.2-sol")
    assert (diagnosis.line, diagnosis.baseline_line, diagnosis.provider_part, diagnosis.explainer_part) == (
        2,
        1,
        "tools",
        "tools",
    )
    assert diagnosis.agrees is True
    assert diagnosis.change is not None and diagnosis.change.headline() == "tool 0 'get_time' -> 'get_date'"
    assert diagnosis.change.first_divergence is not None  # in gpt-6.2-sol's tokens


# --------------------------------------------------------------------------- who answered


@pytest.mark.parametrize(
    ("model", "url", "expected"),
    [
        ("claude-sonnet-5-5", ANTHROPIC_URL, "anthropic:claude-sonnet-5-5"),
        ("claude-sonnet-5-5-20261001", None, "anthropic:claude-sonnet-5-5"),  # a dated snapshot
        (
            "anthropic/claude-haiku-5-5",
            "https://gateway.example.com/v1/messages",
            "anthropic:claude-haiku-5-5",
        ),
        ("gpt-4.1-2025-04-14", "https://api.openai.com/v1/chat/completions", "openai:gpt-4.1"),
        # vLLM answering /v1/messages reports Anthropic-shaped usage too: a local URL, or a model
        # name that is no provider's, is a vLLM server
        ("claude-sonnet-5-5", "http://localhost:8000/v1/messages", None),
        ("claude-sonnet-5-5", "http://10.0.3.7:8000/v1/messages", None),
        ("SmolLM2-135M-Instruct", None, None),
        (
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            ANTHROPIC_URL.replace("api.anthropic.com", "vllm.example.com"),
            None,
        ),
    ],
)
def test_who_answered(model: str, url: str | None, expected: str | None) -> None:
    record = {
        "request": {
            "model": model,
            "max_tokens": 8,
            "system": "s",
            "messages": [{"role": "user", "content": "hi"}],
        },
        "response": message(
            "msg_1",
            model,
            {"input_tokens": 3, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            None,
        ),
    }
    if url:
        record["url"] = url
    origin = answered_by(parse_record(json.dumps(record), 1), load_table())
    assert origin.provider_model == expected, origin.evidence


def test_a_claude_model_the_table_lacks_is_said_so() -> None:
    record = {
        "request": {
            "model": "claude-nova-9",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        },
        "response": message("m", "claude-nova-9", {"input_tokens": 3}, None),
        "url": ANTHROPIC_URL,
    }
    origin = answered_by(parse_record(json.dumps(record), 1), load_table())
    assert (origin.provider, origin.provider_model) == ("anthropic", None)
    assert "the rules table lacks" in origin.evidence


# --------------------------------------------------------------------------- the whole log


def test_anthropic_log_held_to_anthropic_and_its_diagnoses_compared(chat_renderer: ChatRenderer) -> None:
    lines = anthropic_session()
    requests = [parse_record(line, n) for n, line in enumerate(lines, 1)]
    table = load_table()
    explained = explain_requests(requests, chat_renderer, 32)
    # Against the local SmolLM2 rendering every line is "rendered differently"...
    assert all(
        e.reconciliation is not None and e.reconciliation.cause == "rendered differently" for e in explained
    )
    held, origins = reconcile_answered(requests, explained, table)
    assert [o.provider_model for o in origins] == ["anthropic:claude-sonnet-5-5"] * 5 + [
        "anthropic:claude-opus-5-5"
    ]
    # ... held to Anthropic's own rules the shaped usage agrees on every turn.
    assert [(e.reconciliation.reconciled_with, e.reconciliation.agrees) for e in held] == [
        (o.provider_model, True) for o in origins
    ]
    # Automatic caching writes the whole prompt; the next turn reads exactly what turn 1 wrote.
    first, second = held[0].reconciliation, held[1].reconciliation
    assert second.provider_cached_tokens == first.provider_cache_write_tokens == first.provider_prompt_tokens
    assert held[2].reconciliation.provider_cached_tokens == 0  # the clock in the system prompt

    answered = {r.line: o.provider_model for r, o in zip(requests, origins, strict=True)}
    diagnoses = compare_diagnostics(requests, held, table, lambda r: answered[r.line])
    got = [
        (d.line, d.outcome, d.provider_part, d.explainer_part, d.baseline_line, d.agrees) for d in diagnoses
    ]
    assert got == [
        (2, "none_reported", "none", "none", 1, True),  # null diagnostics after an opt-in: nothing diverged
        (3, "miss", "system", "system", 2, True),
        (4, "miss", "tools", "tools", 3, True),
        (5, "baseline_not_found", None, "none", None, None),  # msg_gone: compared with its reference
        (6, "miss", "model", "model", 5, True),
    ]
    assert diagnoses[3].compared_with == 4
    clock = diagnoses[1].change
    assert clock is not None and clock.piece.label == "system block 0" and clock.hint.kind == "timestamp"
    assert summary(diagnoses) == {
        "requests": 5,
        "compared": 4,
        "agree": 4,
        "disagree_lines": [],
        "by_reason": {
            "none_reported": 1,
            "system_changed": 1,
            "tools_changed": 1,
            "previous_message_not_found": 1,
            "model_changed": 1,
        },
    }


def test_disagreements_are_counted() -> None:
    """A constructed contradiction (the provider names messages where the tools changed): the
    count must show it, whatever the reason a real provider would have."""
    lines = anthropic_session()
    record = json.loads(lines[3])
    record["response"]["diagnostics"]["cache_miss_reason"]["type"] = "messages_changed"
    lines[3] = json.dumps(record)
    requests = [parse_record(line, n) for n, line in enumerate(lines, 1)]
    stand_ins = [type("E", (), {"reference_line": None})() for _ in requests]
    totals = summary(compare_diagnostics(requests, stand_ins))  # type: ignore[arg-type]
    assert (totals["compared"], totals["agree"], totals["disagree_lines"]) == (4, 3, [4])


def test_the_vllm_case_is_left_to_the_local_rendering(chat_renderer: ChatRenderer) -> None:
    lines = anthropic_session(url="http://127.0.0.1:8000/v1/messages")
    requests = [parse_record(line, n) for n, line in enumerate(lines, 1)]
    explained = explain_requests(requests, chat_renderer, 32)
    held, origins = reconcile_answered(requests, explained, load_table())
    assert all(o is not None and o.provider_model is None for o in origins)
    assert [e.reconciliation for e in held] == [e.reconciliation for e in explained]
    assert all(e.reconciliation.reconciled_with == "vllm" for e in held)


def test_reconcile_with_provider_names_the_providers_side() -> None:
    from harness.explain.formats import LoggedUsage
    from harness.providers import ProviderUsage

    simulated = ProviderUsage("anthropic:claude-sonnet-5-5", 2000, 1500, 400, 10, 0.01, 0.01, True, ())
    agree = reconcile_with_provider(LoggedUsage(2200, 1650, 440, 10), simulated)
    assert agree.agrees and agree.reconciled_with == "anthropic:claude-sonnet-5-5" and agree.approximate
    evicted = reconcile_with_provider(LoggedUsage(2200, 0, 2090, 10), simulated)
    assert (evicted.agrees, evicted.cause) == (False, "nothing served")
    assert "the provider's side" in (evicted.detail or "")
    assert reconcile_with_provider(LoggedUsage(2200, 1650, 0, 10), simulated).cause == "written differently"
    assert reconcile_with_provider(LoggedUsage(2200, 2100, 0, 10), simulated).cause == "more served"


def test_cli_shows_the_providers_reason_next_to_its_own(tmp_path: Path) -> None:
    log = tmp_path / "anthropic.jsonl"
    log.write_text("\n".join(anthropic_session()) + "\n")
    out = tmp_path / "e.json"
    result = run_script(
        "-m", "harness.explain", str(log), "--json", str(out), timeout=300, env={"COLUMNS": "250"}
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "answered by anthropic:claude-sonnet-5-5 (claude-sonnet-5-5 at api.anthropic.com)" in text
    assert "rendered differently" not in text
    assert (
        "line 4: anthropic says tools_changed (~1,561 tokens missed), against line 3; the explainer finds "
        "tools (tool 0 'search' -> 'summarize', as anthropic:claude-sonnet-5-5 reads it): agree" in text
    )
    assert (
        "agree with the explainer on the part that changed (model, system, tools, messages) on 4 of 4" in text
    )
    document = json.loads(out.read_text())
    validate("explain", document)
    assert document["summary"]["provider_diagnostics"]["agree"] == 4
    rows = {r["line"]: r for r in document["requests"]}
    assert rows[4]["provider_diagnosis"]["reason"] == "tools_changed"
    assert rows[4]["provider_diagnosis"]["explainer_finding"]["piece"] == "tool 0 'summarize'"
    assert rows[6]["answered_by"]["provider_model"] == "anthropic:claude-opus-5-5"
    assert rows[1]["reconciled_with"] == "anthropic:claude-sonnet-5-5" and rows[1]["agrees_with_reported"]
