"""Logs as gateways really write them, and the session field as loggers really write it.

``examples/litellm_log.jsonl`` was written by LiteLLM itself (litellm 1.110.2, a ``CustomLogger``
keeping ``kwargs["standard_logging_object"]``; ``examples/record_litellm_log.py``) against a
real vLLM server: two sessions of an agent with tools and tool calls. LiteLLM keeps the tools and
the other request parameters in ``model_parameters`` and the session in ``trace_id``: read from
anywhere else, every prompt would miss its tools and the two sessions would merge. The server's
own usage is in each record, so the explainer must predict it exactly. No engine starts here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import TOOLS_TEMPLATE, run_script

from harness.explain import explain_requests, parse_record, read_requests
from harness.explain.render import ChatRenderer

ROOT = Path(__file__).resolve().parents[1]
LITELLM_LOG = ROOT / "examples" / "litellm_log.jsonl"


def test_the_litellm_fixture_is_litellms_own_payload() -> None:
    records = [json.loads(line) for line in LITELLM_LOG.read_text().splitlines()]
    assert len(records) == 15
    for record in records:
        # what makes it hard: nothing but the messages beside them, session_id empty
        assert "tools" not in record and record["model_parameters"]["tools"]
        assert record["session_id"] == "" and record["call_type"] == "completion"
    assert {r["trace_id"] for r in records} == {"triage-7", "triage-8"}


def test_litellm_parameters_and_sessions_are_read_from_where_litellm_keeps_them() -> None:
    requests, skipped = read_requests(LITELLM_LOG)
    assert not skipped
    assert [r.session_id for r in requests] == ["triage-7"] * 7 + ["triage-8"] * 8
    for request in requests:
        assert request.format == "openai"
        assert [t["function"]["name"] for t in request.body["tools"]][0] in ("search_code", "read_file")
        assert request.body["tool_choice"] == "none" and request.body["max_tokens"] == 16
        assert request.timestamp is not None and request.response is not None


def test_a_litellm_log_is_predicted_exactly(tools_renderer: ChatRenderer) -> None:
    requests, _ = read_requests(LITELLM_LOG)
    explained = explain_requests(requests, tools_renderer, 32)
    for request, e in zip(requests, explained, strict=True):
        assert request.response is not None and request.response.usage is not None
        usage = request.response.usage
        assert e.prompt_tokens == usage.prompt_tokens, e.line  # the tools are in the prompt
        assert e.predicted_cached_tokens == usage.cached_tokens, e.line
    # one break, the planted one (the tool list reordered on turn 4 of triage-8); triage-7 is
    # append-only from start to end, as it is once the sessions are kept apart
    assert [(e.line, e.hint.kind if e.hint else None) for e in explained if e.is_break] == [
        (11, "tools_reordered")
    ]
    assert [e.status for e in explained[:7]] == ["cold"] + ["extends"] * 6


def litellm_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": "chatcmpl-1",
        "trace_id": "3f1c",
        "session_id": "",
        "call_type": "completion",
        "startTime": 1796188821.3,
        "messages": [{"role": "user", "content": "Hi."}],
        "model_parameters": {"temperature": 0, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": "Yo."}}]},
        "metadata": {"user_api_key_hash": None},
    }
    return record | changes


@pytest.mark.parametrize(
    ("record", "session_field", "session"),
    [
        (litellm_record(), "session_id", "3f1c"),  # no session given: LiteLLM's per-call trace id
        (litellm_record(session_id="s-9"), "session_id", "s-9"),  # request_correlation_in_logs on
        (litellm_record(metadata={"conversation": 5}), "conversation", "5"),  # --session-field
        (litellm_record(), "conversation", None),  # another field asked for: no trace_id fallback
    ],
)
def test_litellm_sessions(record: dict[str, Any], session_field: str, session: str | None) -> None:
    assert parse_record(json.dumps(record), 1, session_field).session_id == session


def test_litellm_extra_body_goes_where_the_sdk_sends_it() -> None:
    params = {"max_tokens": 5, "extra_body": {"cache_salt": "tenant-a", "chat_template_kwargs": {"x": 1}}}
    request = parse_record(json.dumps(litellm_record(model_parameters=params)), 1)
    assert request.body == {
        "cache_salt": "tenant-a",
        "chat_template_kwargs": {"x": 1},
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi."}],
    }


def test_a_numeric_session_id_in_the_body_is_the_sessions_key_not_an_error(tmp_path: Path) -> None:
    """As loggers write it: ``"session_id": 42`` inside the Chat Completions body (vLLM's own
    ``session_id`` field is a string; the explainer used to pass the number on and be refused)."""
    lines = [
        {"session_id": 42, "messages": [{"role": "user", "content": "Hi."}]},
        {"session_id": 43, "messages": [{"role": "user", "content": "Hello."}]},
        {
            "session_id": 42,
            "messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}],
        },
    ]
    log = tmp_path / "numeric.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.json"
    proc = run_script(
        "-m", "harness.explain", str(log), "--chat-template", str(TOOLS_TEMPLATE), "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["requests"]
    assert [(r["session_id"], r["status"]) for r in rows] == [
        ("42", "cold"),
        ("43", "cold"),
        ("42", "extends"),
    ]
