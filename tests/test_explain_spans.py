"""Smart splitting and prices: the volatile spans of a log at their exact first token, fixes that
make the next request extend (checked by running the analysis again), and the log priced per
provider. No engine: the rendering is vLLM's, without an engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import validate

import append_only_vs_inplace_edit as lesson2
import stable_prefix_vs_timestamp as lesson1
from harness.explain import ChatRequest, explain_requests, read_requests
from harness.explain.costs import price_log
from harness.explain.render import ChatRenderer
from harness.explain.spans import apply_fix, find_spans, span_values
from harness.providers import load_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "agent_trace.jsonl"


def first_difference(a: list[int], b: list[int]) -> int:
    """Written out again, independent of harness.prefix."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def as_log(conversations: list[list[dict[str, str]]], session: str) -> list[ChatRequest]:
    return [ChatRequest(i + 1, {"messages": m}, "openai", session) for i, m in enumerate(conversations)]


def test_spans_of_the_example_log_at_their_first_token_and_fixed(chat_renderer: ChatRenderer) -> None:
    requests, _ = read_requests(EXAMPLE)
    explained = explain_requests(requests, chat_renderer, 32)
    spans = find_spans(explained)
    by_line = {r.line: r for r in requests}
    assert {(s.line, s.kind, s.message_index) for s in spans} == {
        (4, "timestamp", 0),
        (6, "json_key_order", 1),
        (7, "uuid", 0),
    }
    assert [s.tokens_lost for s in spans] == sorted((s.tokens_lost for s in spans), reverse=True)
    for span in spans:
        e = next(x for x in explained if x.line == span.line)
        new = chat_renderer.render(by_line[span.line]).token_ids
        old = chat_renderer.render(by_line[e.reference_line]).token_ids
        assert span.start_token == first_difference(new, old)
        assert span.start_token < span.end_token <= len(new)
        assert new[span.end_token : span.end_token + 8] != []  # the prompts agree again after it
        assert span.tokens_lost == e.lost_tokens > 0
        fixed = apply_fix(requests, span, span_values(explained, span))
        again = {x.line: x for x in explain_requests(fixed, chat_renderer, 32)}
        assert again[span.line].status == "extends", (span.kind, again[span.line])
        assert again[span.line].predicted_cached_tokens > e.predicted_cached_tokens
    uuid = next(s for s in spans if s.kind == "uuid")
    assert uuid.text == "9d41c7e2-05ab-4f3e-8c6d-2e7f1a9b3c58"


def test_lesson1_clock_is_found_and_moving_it_makes_every_turn_extend(chat_renderer: ChatRenderer) -> None:
    log = as_log(lesson1.build_wrong(4, quick=True), "lesson1")
    explained = explain_requests(log, chat_renderer, 32)
    assert [e.status for e in explained] == ["cold", "break", "break", "break"]
    spans = find_spans(explained)
    assert len(spans) == 1
    span = spans[0]
    assert (span.kind, span.message_index, span.occurrences) == ("timestamp", 0, 3)
    first = chat_renderer.render(log[0]).token_ids
    second = chat_renderer.render(log[1]).token_ids
    assert span.start_token == first_difference(second, first)
    fixed = apply_fix(log, span, span_values(explained, span))
    assert "Current date and time" not in fixed[1].body["messages"][0]["content"]
    assert [e.status for e in explain_requests(fixed, chat_renderer, 32)] == [
        "cold",
        "extends",
        "extends",
        "extends",
    ]


def test_lesson2_state_counter_is_found_and_moved(chat_renderer: ChatRenderer) -> None:
    log = as_log(lesson2.build_wrong(3, quick=True), "lesson2")
    explained = explain_requests(log, chat_renderer, 32)
    spans = find_spans(explained)
    top = spans[0]
    assert (top.kind, top.message_index) == ("counter", 1)  # "step": 0 -> 1, in the state message
    assert top.start_token == first_difference(
        chat_renderer.render(log[1]).token_ids, chat_renderer.render(log[0]).token_ids
    )
    fixed = apply_fix(log, top, span_values(explained, top))
    assert [e.status for e in explain_requests(fixed, chat_renderer, 32)] == ["cold", "extends", "extends"]


def test_the_log_priced_per_provider(chat_renderer: ChatRenderer, tmp_path: Path) -> None:
    requests, _ = read_requests(EXAMPLE)
    explained = explain_requests(requests, chat_renderer, 32)
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {
                "models": {
                    "vllm:*": {"price": {"input": 1.0, "cache_read": 0.1, "output": 4.0}},
                    "sglang:*": {"price": {"input": 1.0, "cache_read": 0.1, "output": 4.0}},
                }
            }
        )
    )
    table = load_table(prices)
    vllm, sglang, openai = price_log(
        ["vllm", "sglang", "openai:gpt-6.2-sol"], requests, explained, table, "m"
    )
    # vLLM: this analysis' own numbers, priced by hand
    assert [u.cached_tokens for u in vllm.usages] == [e.predicted_cached_tokens for e in explained]
    spent = (
        sum(
            (e.prompt_tokens - e.predicted_cached_tokens) * 1.0 + e.predicted_cached_tokens * 0.1
            for e in explained
        )
        / 1e6
    )
    assert vllm.spent_usd == pytest.approx(spent)
    lost = sum(e.lost_tokens * (1.0 - 0.1) for e in explained if e.is_break) / 1e6
    assert vllm.lost_to_breaks_usd == pytest.approx(lost)
    assert set(vllm.lost_by_cause) == {"timestamp", "json_key_order", "uuid"}
    # SGLang (page size 1): every shared token but the last prompt token
    assert [u.cached_tokens for u in sglang.usages] == [
        min(e.cache_common_prefix, e.prompt_tokens - 1) for e in explained
    ]
    assert all(
        s >= v
        for s, v in zip(sglang.usages, vllm.usages, strict=True)
        for s, v in [(s.cached_tokens, v.cached_tokens)]
    )
    # OpenAI: these prompts are all below its 1,024-token minimum: nothing cached
    assert all(u.prompt_tokens < 1024 and u.cached_tokens == 0 for u in openai.usages)
    assert not openai.approximate


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.explain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--provider", "openai:gpt-nope"), "error: unknown provider/model 'openai:gpt-nope'"),
        (("--provider", "nonsense"), "error: unknown provider 'nonsense'; providers: anthropic, azure, "),
        (("--prices", "/nonexistent/p.json"), "error: "),
    ],
)
def test_bad_provider_flags_fail_before_anything_slow(args: tuple[str, ...], message: str) -> None:
    result = run_cli(str(EXAMPLE), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_suggest_and_spans_in_the_json(tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    result = run_cli(str(EXAMPLE), "--suggest", "--provider", "vllm", "--json", str(out))
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    validate("explain", document)
    spans = document["volatile_spans"]
    assert [s["tokens_lost"] for s in spans] == sorted((s["tokens_lost"] for s in spans), reverse=True)
    assert {"session_id", "message_index", "start_token", "end_token", "kind", "tokens_lost", "fix"} <= set(
        spans[0]
    )
    suggestion = document["suggestion"]
    assert suggestion["span"] == spans[0]
    assert suggestion["before"]["status"] == "break" and suggestion["after"]["status"] == "extends"
    assert "vllm:SmolLM2-135M-Instruct" in document["cost"]
    assert "suggestion: the timestamp span" in result.stdout
