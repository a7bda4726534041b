"""Causes at each provider: every dollar a break costs under --provider has a cause, found on the
rendering that provider reads (the tool list a hosted API always reads, even when the local chat
template drops it). No engine: vLLM's rendering and the providers' simulation only."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
from conftest import run_script, validate

from harness.explain import ChatRequest, explain_requests, read_requests
from harness.explain.costs import UNKNOWN, LogCost, Loss, price_log, usd_by_line
from harness.explain.provider_view import first_change, segments_of
from harness.explain.render import ChatRenderer
from harness.explain.report import cost_table, print_provider_breaks
from harness.explain.spans import find_spans, provider_spans
from harness.providers import load_table

ROOT = Path(__file__).resolve().parents[1]
TOOLS_LOG = ROOT / "examples" / "agent_tools_log.jsonl"  # recorded; its agent rotates its tools at line 4
HOSTED = ["openai:gpt-4.1", "openai:gpt-6.2-sol", "anthropic:claude-sonnet-5-5"]


def o200k(text: str) -> list[int]:
    import bpe_openai

    return list(bpe_openai.get_encoding("o200k_base").encode_ordinary(text))


def shared(a: list[int], b: list[int]) -> int:
    """Written out again, independent of harness.prefix and harness.providers."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_every_lost_dollar_has_a_cause_when_the_local_template_hides_it(chat_renderer: ChatRenderer) -> None:
    requests, _ = read_requests(TOOLS_LOG)
    explained = explain_requests(requests, chat_renderer, 32)
    by_line = {e.line: e for e in explained}
    # The default template drops the tool list: locally the rotated tools change nothing at line 4.
    assert by_line[4].status == "extends" and by_line[9].status == "break"
    costs = price_log(HOSTED, requests, explained, load_table(), "m")
    for cost in costs:
        lost = sum(
            u.cost_usd - u.cost_if_extended_usd
            for u in cost.usages
            if u.cost_usd is not None
            and u.cost_if_extended_usd is not None
            and u.cost_usd > u.cost_if_extended_usd
        )
        assert lost > 0
        assert cost.lost_to_breaks_usd == pytest.approx(lost, rel=1e-12)
        assert sum(cost.lost_by_cause.values()) == pytest.approx(lost, rel=1e-12)
        assert set(cost.lost_by_cause) == {"tools_reordered", "timestamp"}, cost.provider_model
        tools = next(loss for loss in cost.losses if loss.line == 4)
        assert (tools.cause, tools.found_by, tools.same_as_local) == (
            "tools_reordered",
            cost.provider_model,
            False,
        )
        clock = next(loss for loss in cost.losses if loss.line == 9)
        assert (clock.cause, clock.same_as_local) == ("timestamp", True)  # the local analysis names it too

    gpt41 = costs[0]
    change = gpt41.changes[3]  # line 4
    assert change is not None and change.reference_line == 3
    assert (change.part, change.piece.label, change.previous.label) == (
        "tools",
        "tool 0 'read_file'",
        "tool 0 'search_code'",
    )
    assert change.headline() == "tool 0 'search_code' -> 'read_file'"
    assert change.hint is not None and change.hint.kind == "tools_reordered"
    # OpenAI reads the tool list first, each tool as its JSON: the offset is where the two first
    # tools' o200k tokens part.
    old_tool = json.dumps(requests[2].body["tools"][0], ensure_ascii=False)
    new_tool = json.dumps(requests[3].body["tools"][0], ensure_ascii=False)
    assert change.first_divergence == shared(o200k(old_tool), o200k(new_tool)) > 0
    assert change.text.startswith("read_file") and change.previous_text.startswith("search_code")
    assert not change.approximate and costs[2].changes[3].approximate  # Anthropic counts are approximate

    # The spans: the rotated tools are a span of the providers' reading, with each one's dollars;
    # the clock is the local span, carrying the same providers' dollars.
    spans = provider_spans(costs)
    assert [(s.kind, s.provider, s.piece, s.line) for s in spans] == [
        ("tools_reordered", "openai:gpt-4.1", "tool 0 'read_file'", 4)
    ]
    assert spans[0].usd_lost == {
        c.provider_model: next(x.usd for x in c.losses if x.line == 4) for c in costs
    }
    assert spans[0].tokens_lost == next(x.tokens for x in gpt41.losses if x.line == 4) > 0
    local = find_spans(explained, usd_by_line(costs))
    assert [(s.kind, s.line, s.provider) for s in local] == [("timestamp", 9, None)]
    assert set(local[0].usd_lost) == set(HOSTED)


def test_a_template_that_renders_the_tools_finds_the_same_cause_itself(tools_renderer: ChatRenderer) -> None:
    requests, _ = read_requests(TOOLS_LOG)
    explained = explain_requests(requests, tools_renderer, 32)
    costs = price_log(HOSTED, requests, explained, load_table(), "m")
    assert all(loss.same_as_local for cost in costs for loss in cost.losses)
    assert provider_spans(costs) == []
    spans = find_spans(explained, usd_by_line(costs))
    assert {(s.kind, s.line) for s in spans} == {("tools_reordered", 4), ("timestamp", 9)}
    for cost in costs:
        assert sum(s.usd_lost[cost.provider_model] for s in spans) == pytest.approx(cost.lost_to_breaks_usd)


def test_an_engine_loss_without_a_break_is_the_cache_salt(
    chat_renderer: ChatRenderer, tmp_path: Path
) -> None:
    first = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "hi"}]
    second = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    log = [
        ChatRequest(1, {"messages": first, "cache_salt": "tenant-a"}, "openai", "s"),
        ChatRequest(2, {"messages": second, "cache_salt": "tenant-b"}, "openai", "s"),
    ]
    explained = explain_requests(log, chat_renderer, 32)
    assert explained[1].status == "extends" and explained[1].predicted_cached_tokens == 0
    prices = tmp_path / "p.json"
    prices.write_text(json.dumps({"models": {"vllm:*": {"price": {"input": 1.0, "cache_read": 0.1}}}}))
    (vllm,) = price_log(["vllm"], log, explained, load_table(prices), "m")
    assert [(loss.line, loss.cause, loss.found_by) for loss in vllm.losses] == [(2, "cache_salt", "local")]
    assert vllm.lost_to_breaks_usd == pytest.approx(explained[1].lost_tokens * 0.9 / 1e6)


def responses_body(instructions: str, tools: list[str], turns: list[str]) -> dict[str, object]:
    return {
        "model": "gpt-6.2-sol",
        "instructions": instructions,
        "tools": [{"type": "function", "name": name, "parameters": {"type": "object"}} for name in tools],
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]} for t in turns
        ],
    }


def test_responses_api_bodies_are_read_in_the_providers_pieces() -> None:
    table = load_table()
    policy = "You answer support questions. Policy:\n" + "Refunds within 30 days.\n" * 20
    old = ChatRequest(1, responses_body(policy, ["get_time"], ["Hi"]), "responses", "s")
    kinds = [(s.kind, s.role) for s in segments_of(old)]
    assert kinds == [("tool", None), ("system", "developer"), ("message", "user")]
    stamped = ChatRequest(
        2, responses_body("Now: 2026-12-02 10:14 UTC\n" + policy, ["get_time"], ["Hi"]), "r", "s"
    )
    change = first_change(old, stamped, table.entry("openai:gpt-6.2-sol"))
    assert change is not None and (change.part, change.piece.label, change.where()) == (
        "system",
        "instructions",
        "the instructions",
    )
    assert change.hint is not None and change.hint.kind == "timestamp"
    # The tools come first in OpenAI's prefix, so a renamed tool is the first change.
    renamed = ChatRequest(3, responses_body(policy, ["get_date"], ["Hi"]), "responses", "s")
    change = first_change(old, renamed)
    assert change is not None and change.headline() == "tool 0 'get_time' -> 'get_date'"
    assert change.first_divergence is None  # compared piece by piece: no provider, no tokens
    more = ChatRequest(4, responses_body(policy, ["get_time"], ["Hi", "And then?"]), "responses", "s")
    assert first_change(old, more, table.entry("openai:gpt-6.2-sol")) is None  # append-only


def test_a_history_cut_short_breaks_on_openai_framing_but_not_on_anthropic() -> None:
    table = load_table()
    turns = [
        {"role": "user", "content": "Summarize section 1. " * 30},
        {"role": "assistant", "content": "Done."},
    ]
    longer = ChatRequest(1, {"messages": [*turns, {"role": "user", "content": "Next."}]}, "openai", "s")
    shorter = ChatRequest(2, {"messages": copy.deepcopy(turns)}, "openai", "s")
    change = first_change(longer, shorter, table.entry("openai:gpt-4.1"))
    # OpenAI primes the reply where the reference had its next message: the prefix stops there.
    assert change is not None and change.piece.kind == "priming" and change.cause == "history_truncated"
    assert change.part == "messages"
    assert first_change(longer, shorter, table.entry("anthropic:claude-sonnet-5-5")) is None


def render(renderable: object) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=200).print(renderable)
    return out.getvalue()


def test_the_approximate_footnote_only_where_a_count_is_approximate() -> None:
    exact = LogCost("openai:gpt-4.1", 0.01, 0.0, prompt_tokens=2000, cached_tokens=1000)
    rough = LogCost("anthropic:claude-sonnet-5-5", 0.01, 0.0, approximate=True, prompt_tokens=2000)
    unpriced = LogCost("vllm:m", None, None, prompt_tokens=2000)
    assert "~" not in render(cost_table([exact])) and "n/a" not in render(cost_table([exact]))
    assert "~ token counts approximate" in render(cost_table([exact, rough]))
    assert "n/a: no price" in render(cost_table([exact, unpriced])) and "~ token" not in render(
        cost_table([exact, unpriced])
    )


def test_a_loss_with_nothing_changed_is_named_the_providers_side(chat_renderer: ChatRenderer) -> None:
    log = [ChatRequest(1, {"messages": [{"role": "user", "content": "hi"}]}, "openai", "s")]
    explained = explain_requests(log, chat_renderer, 32)
    cost = LogCost(
        "openai:gpt-4.1",
        0.01,
        0.002,
        {UNKNOWN: 0.002},
        losses=(Loss(1, 0.002, 500, UNKNOWN, UNKNOWN, False),),
        prompt_tokens=2000,
        cached_tokens=1000,
    )
    from rich.console import Console

    out = io.StringIO()
    print_provider_breaks(explained, [cost], "m", Console(file=out, width=300))
    assert (
        "line 1: $0.0020 lost under openai:gpt-4.1 with nothing changed in the bodies: the provider's side"
        in (out.getvalue())
    )


def test_cli_names_the_rendering_that_found_the_cause(tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    result = run_script(
        "-m",
        "harness.explain",
        str(TOOLS_LOG),
        "--provider",
        "openai:gpt-4.1",
        "--json",
        str(out),
        timeout=300,
        env={"COLUMNS": "250"},
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert (
        "line 4 (session atlas-openai): breaks in the tool list, as openai:gpt-4.1 reads it: "
        "tool 0 'search_code' -> 'read_file'; compared with line 3" in text
    )
    assert "no break in the local rendering (SmolLM2-135M-Instruct)" in text
    assert "~ token counts approximate" not in text  # OpenAI's text tokens are exact
    document = json.loads(out.read_text())
    validate("explain", document)
    cost = document["cost"]["openai:gpt-4.1"]
    assert sum(cost["lost_by_cause_usd"].values()) == pytest.approx(cost["lost_to_breaks_usd"], abs=1e-6)
    row = next(r for r in document["requests"] if r["line"] == 4)["providers"]["openai:gpt-4.1"]
    assert (row["status"], row["cause"], row["found_by"]) == ("break", "tools_reordered", "openai:gpt-4.1")
    assert row["lost_usd"] == pytest.approx(row["cost_usd"] - row["cost_if_extended_usd"], abs=1e-6)
    assert row["change"]["piece"] == "tool 0 'read_file'" and row["change"]["part"] == "tools"
    span = next(s for s in document["volatile_spans"] if s["provider"] == "openai:gpt-4.1")
    assert (span["kind"], span["piece"], span["line"]) == ("tools_reordered", "tool 0 'read_file'", 4)
