"""Lesson 1: the builders, and the lesson on the real engine in quick mode."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import run_script, validate

import stable_prefix_vs_timestamp as lesson
from harness.backend import ChatTokenizer, OfflineBackend
from harness.prefix import common_prefix_len


def test_right_system_prompt_is_byte_stable_and_requests_only_grow() -> None:
    right = lesson.build_right(6)
    assert len({r[0]["content"] for r in right}) == 1
    for earlier, later in zip(right, right[1:], strict=False):
        assert later[: len(earlier)] == earlier  # append-only: every earlier message unchanged
        assert len(later) == len(earlier) + 2


def test_wrong_system_prompt_changes_every_turn() -> None:
    wrong = lesson.build_wrong(6)
    systems = [r[0]["content"] for r in wrong]
    assert len(set(systems)) == 6
    assert systems[0].startswith("Current date and time: 2026-11-27 09:30:05 UTC")
    assert systems[1].startswith("Current date and time: 2026-11-27 09:30:12 UTC")


def test_both_variants_carry_the_same_conversation() -> None:
    strip = lambda text: text.split("] ", 1)[1] if text.startswith("[") else text  # noqa: E731
    for w, r in zip(lesson.build_wrong(4), lesson.build_right(4), strict=True):
        assert [m["role"] for m in w] == [m["role"] for m in r]
        assert [m["content"] for m in w[1:]] == [strip(m["content"]) for m in r[1:]]


def test_wrong_prompts_diverge_inside_the_first_block(tokenizer: ChatTokenizer) -> None:
    ids = [tokenizer.render(r) for r in lesson.build_wrong(3)]
    assert common_prefix_len(ids[0], ids[1]) < 32
    assert tokenizer.decode(ids[1][: common_prefix_len(ids[0], ids[1])]).endswith("09:30:")


def quick_args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {"quick": True, "turns": None, "max_tokens": 1}
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.engine
def test_quick_lesson_on_the_engine(engine: OfflineBackend) -> None:
    result = lesson.run(engine, quick_args())
    data = result.to_json()
    wrong, right = (v["summary"] for v in data["variants"])
    for v in data["variants"]:
        for r in v["requests"]:
            assert r["cached_tokens"] == r["predicted_cached_tokens"], (v["name"], r)
        assert v["engine_counters"]["agree_with_requests"] is True
    assert wrong["cached_tokens"] == 0
    assert right["hit_rate"] > wrong["hit_rate"] + 0.4
    # The second WRONG turn leaves the cache at the clock's tens-of-seconds digit (05 -> 12).
    record = result.variant("wrong").requests[1]
    assert record.divergence is not None
    assert record.divergence.before.endswith("09:30:")
    assert (record.divergence.previous_token, record.divergence.token) == ("0", "1")
    # RIGHT leaves it exactly where the previous prompt ended.
    right_records = result.variant("right").requests
    assert right_records[1].first_divergence == right_records[0].prompt_tokens
    assert json.loads(json.dumps(data))["example"] == "stable_prefix_vs_timestamp"
    validate("lesson", json.loads(json.dumps(data)))


@pytest.mark.parametrize("turns", ["1", "0", "-3"])
def test_turns_below_two_is_a_one_line_error(turns: str) -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--turns", turns)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --turns must be at least 2")
    assert "Traceback" not in proc.stderr
