"""The lessons' summary: the prompt cost line priced at a provider's list prices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import validate

from harness.backend import EngineInfo
from harness.measure import RequestRecord, VariantResult
from harness.report import DEFAULT_PRICE_AS, ExampleResult

ROOT = Path(__file__).resolve().parents[1]


def variant(name: str, rows: list[tuple[int, int]]) -> VariantResult:
    records = [
        RequestRecord(i, prompt, cached, cached, 10.0, cached) for i, (prompt, cached) in enumerate(rows)
    ]
    return VariantResult(name, name, records)


@pytest.mark.parametrize("provider_model", [DEFAULT_PRICE_AS, "anthropic:claude-haiku-4-5"])
def test_comparison_prices_the_prompt_tokens(provider_model: str) -> None:
    wrong = variant("wrong", [(1000, 0), (1100, 0)])
    right = variant("right", [(1000, 0), (1100, 992)])
    result = ExampleResult(
        "x", EngineInfo("vllm", "m", "cpu", 32, "0"), [wrong, right], price_as=provider_model
    )
    prices = json.loads((ROOT / "harness" / "data" / "providers.json").read_text())["models"][provider_model][
        "price"
    ]
    c = result.comparison()
    assert c["cost_provider"] == provider_model
    assert c["cost_wrong_usd"] == pytest.approx(2100 * prices["input"] / 1e6)
    assert c["cost_right_usd"] == pytest.approx(
        ((2100 - 992) * prices["input"] + 992 * prices["cache_read"]) / 1e6
    )
    assert c["cost_right_usd"] < c["cost_wrong_usd"]


@pytest.mark.parametrize(
    ("path", "schema"),
    [
        ("docs/report/summary.json", "runner"),
        ("docs/runs/session_consistency-cache-salt-session.json", "lesson"),
        ("docs/runs/session_consistency-scaling.json", "lesson"),
        ("docs/runs/manual_cache_boundary-auto-boundary.json", "lesson"),
        ("docs/monitor/run.json", "monitor"),
    ],
)
def test_committed_runs_follow_the_json_contract(path: str, schema: str) -> None:
    """The runs the README quotes are what the scripts write today, not an older shape."""
    validate(schema, json.loads((ROOT / path).read_text()))
