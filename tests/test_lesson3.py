"""Lesson 3: the request set, the flags, and the lesson on the real engines in quick mode.

Expected token positions are worked out here from the rendered chat text and the tokenizer's
own ``encode`` with a plain loop, not by the harness functions the lesson uses. The quick run
happens once per module on the shared engine (WRONG with prefix-cache reads off, as
``run_all_examples.py`` runs it) and one transformers breakpoint engine.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import pytest
from conftest import run_script

import manual_cache_boundary as lesson
from harness.backend import ChatTokenizer, Message, OfflineBackend
from harness.cli import add_common_args
from harness.errors import UserError
from harness.manual_cache import CACHE_MARKER, ManualCacheEngine
from harness.measure import RequestRecord
from harness.report import ExampleResult

BLOCK = 32


def lesson_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    lesson.add_lesson_args(parser)
    return parser.parse_args(list(flags))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def stable_ids(tokenizer: ChatTokenizer, messages: list[Message], marker: str = CACHE_MARKER) -> list[int]:
    """The tokens before the marker, as the chat template renders them."""
    return tokenizer.encode(tokenizer.render_text(messages).split(marker)[0])


# --------------------------------------------------------------------------- request set


def test_questions_share_a_byte_identical_stable_part_ending_in_the_marker() -> None:
    built = lesson.build_requests(5, quick=False, marker=CACHE_MARKER, misuse=True)
    assert built.kinds == ["question"] * 5 + ["misuse"]
    systems = [r[0]["content"] for r in built.requests]
    assert len(set(systems[:5])) == 1
    assert all(s.endswith(CACHE_MARKER) and s.count(CACHE_MARKER) == 1 for s in systems)
    assert [r[1]["content"] for r in built.requests[:5]] == lesson.QUESTIONS[:5]
    # The misuse: the same stable part but for a timestamp in the documents' header.
    assert "Reference documents (retrieved 2026-11-27 09:37:22 UTC):" in systems[5]
    assert systems[5].replace(" (retrieved 2026-11-27 09:37:22 UTC)", "") == systems[0]


def test_without_misuse_and_with_prewarm() -> None:
    built = lesson.build_requests(3, quick=True, marker="<<C>>", misuse=False, padding=" . .", prewarm=True)
    assert built.kinds == ["pre-warm", "question", "question", "question"]
    assert built.requests[0][1]["content"] == ""
    assert all(r[0]["content"].endswith(" . .<<C>>") for r in built.requests)
    assert all("<<C>>" not in m["content"] for r in built.stripped("<<C>>") for m in r)


def test_padding_puts_the_marker_on_a_block_boundary(tokenizer: ChatTokenizer) -> None:
    def count(stable: str) -> int:
        return len(stable_ids(tokenizer, lesson.chat_request(stable, "?", CACHE_MARKER)))

    stable = lesson.stable_part(quick=True)
    padding = lesson.block_padding(stable, BLOCK, count)
    assert count(stable + padding) % BLOCK == 0
    assert 0 <= count(stable + padding) - count(stable) < BLOCK
    assert set(padding) <= {" ", "."}


def test_marker_inside_the_prompt_text_is_refused() -> None:
    with pytest.raises(UserError, match="occurs in the prompt text itself"):
        lesson.settings_from(lesson_args("--marker", "Reference documents"))


def test_bad_question_count_is_a_one_line_error() -> None:
    proc = run_script("manual_cache_boundary.py", "--questions", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --questions must be between 2 and 12")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_exactness_sample_spreads_over_the_warm_requests() -> None:
    def records(cached: list[int]) -> list[RequestRecord]:
        return [RequestRecord(i, 100, c, c, 1.0, c) for i, c in enumerate(cached)]

    run = records([0, 90, 90, 90, 90, 90, 90, 90, 0])  # cold first, a miss last
    assert lesson.exactness_sample(run, 3) == [1, 4, 7]
    assert lesson.exactness_sample(run, 1) == [7]
    assert lesson.exactness_sample(run, 20) == [1, 2, 3, 4, 5, 6, 7]
    assert lesson.exactness_sample(run, 0) == list(range(9))
    assert lesson.exactness_sample(records([0, 0]), 3) == [0, 1]  # nothing warm: check them all
    assert lesson.settings_from(lesson_args()).exactness_checks == lesson.DEFAULT_EXACTNESS_CHECKS
    assert lesson.settings_from(lesson_args("--quick")).exactness_checks == 0
    with pytest.raises(UserError, match="--exactness-checks must be 0 \\(all\\) or more, got -1"):
        lesson.settings_from(lesson_args("--exactness-checks", "-1"))


# --------------------------------------------------------------------------- on the engines


@pytest.fixture(scope="module")
def manual(model_path: str) -> ManualCacheEngine:
    return ManualCacheEngine(model_path)


@pytest.fixture(scope="module")
def quick_result(engine: OfflineBackend, manual: ManualCacheEngine) -> ExampleResult:
    return lesson.run(engine, lesson_args("--quick", "--check-tokens", "4"), manual=manual)


@pytest.mark.engine
def test_no_caching_reuses_nothing(quick_result: ExampleResult) -> None:
    wrong = quick_result.variant("wrong")
    assert len(wrong.requests) == lesson.QUICK_QUESTIONS + 1
    assert all(r.cached_tokens == 0 == r.predicted_cached_tokens for r in wrong.requests)
    # Not 0 by luck: the same prompts on the same engine with reads on share the stable part.
    assert all(r.cached_tokens > 0 for r in quick_result.variant("apc").requests[1:])
    assert quick_result.extra["no_caching_engine_counters"] == {
        "prefix_cache_queries": 0,
        "prefix_cache_hits": 0,
    }


@pytest.mark.engine
def test_manual_breakpoint_reuses_the_stable_part_after_the_first_request(
    quick_result: ExampleResult, tokenizer: ChatTokenizer
) -> None:
    built = lesson.build_requests(lesson.QUICK_QUESTIONS, True, CACHE_MARKER, misuse=True)
    stable = len(stable_ids(tokenizer, built.requests[0]))
    right = quick_result.variant("right")
    questions = [r for r in right.requests if r.extra["request"] == "question"]
    assert questions[0].cached_tokens == 0
    for record in questions[1:]:
        assert record.cached_tokens == record.predicted_cached_tokens == stable, record
        assert record.first_divergence == stable
    assert all(r.prediction_ok for r in right.requests)
    exactness = quick_result.extra["exactness"]
    assert exactness["all_identical"] is True
    assert exactness["requests"] == exactness["of_requests"] == len(right.requests)
    assert all(r.extra["identical_to_full_recompute"] for r in right.requests)
    assert quick_result.extra["same_prompt_tokens_on_all_engines"] is True
    memory = quick_result.extra["kv_memory"]
    assert memory["formula_matches_tensors"] is True
    assert memory["stable_prefix_bytes"] == stable * 46_080


@pytest.mark.engine
def test_apc_cached_tokens_equal_the_prediction_and_alignment_reaches_the_marker(
    quick_result: ExampleResult,
) -> None:
    for name in ("apc", "apc_aligned"):
        variant = quick_result.variant(name)
        assert all(r.prediction_ok for r in variant.requests), name
        assert variant.counters_agree() is True, name
    marker = quick_result.extra["marker"]
    stable = marker["marker_at_token"]
    assert marker["apc_cached_on_hits"] == [BLOCK * (stable // BLOCK)]  # the last partial block is lost
    assert marker["aligned_marker_at_token"] % BLOCK == 0
    assert marker["aligned_cached_on_hits"] == [marker["aligned_marker_at_token"]]
    aligned = quick_result.variant("apc_aligned").requests
    assert aligned[0].extra["request"] == "pre-warm" and aligned[0].cached_tokens == 0
    assert aligned[1].cached_tokens == marker["aligned_marker_at_token"]  # the first question hits


@pytest.mark.engine
def test_misuse_is_a_miss_flagged_at_the_exact_token(
    quick_result: ExampleResult, tokenizer: ChatTokenizer
) -> None:
    built = lesson.build_requests(lesson.QUICK_QUESTIONS, True, CACHE_MARKER, misuse=True)
    normal, broken = (stable_ids(tokenizer, r) for r in (built.requests[0], built.requests[-1]))
    expected = first_difference(normal, broken)
    assert tokenizer.decode(broken[:expected]).endswith("Reference documents")
    record = quick_result.variant("right").requests[-1]
    assert record.extra["request"] == "misuse"
    assert record.cached_tokens == 0 == record.predicted_cached_tokens
    assert record.first_divergence == expected
    flag = f"first divergence at token {expected} of {len(broken)}"
    assert any(flag in warning for warning in record.extra["warnings"])
    misuse = quick_result.extra["misuse"]
    assert misuse["divergence_index"] == expected
    # APC keeps the whole blocks before the change; the breakpoint engine loses all of it.
    assert misuse["cached_tokens"]["apc"] == BLOCK * (expected // BLOCK)


@pytest.mark.engine
def test_json_contract(quick_result: ExampleResult) -> None:
    data = json.loads(json.dumps(quick_result.to_json()))
    assert data["example"] == "manual_cache_boundary"
    assert [v["name"] for v in data["variants"]] == ["wrong", "right", "apc", "apc_aligned"]
    assert data["comparison"]["hit_rate_wrong"] == 0.0
    assert data["comparison"]["hit_rate_right"] > 0.5
    assert data["comparison"]["prediction_matches"] is True
    assert set(data["ttft_speedup_vs_no_caching"]) == {"wrong", "right", "apc", "apc_aligned"}
