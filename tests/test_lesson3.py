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
from typing import Any

import pytest
from conftest import run_script, validate

import manual_cache_boundary as lesson
from harness.backend import Message, OfflineBackend, PrefixCounters
from harness.cli import add_common_args
from harness.errors import UserError
from harness.manual_cache import CACHE_MARKER, ManualCacheEngine, exactness_sample

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


@pytest.fixture(scope="module")
def hf_tokenizer(model_path: str) -> Any:
    """The model's own tokenizer and chat template (transformers), not the harness's wrapper."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def stable_ids(hf_tokenizer: Any, messages: list[Message], marker: str = CACHE_MARKER) -> list[int]:
    """The tokens before the marker, as the chat template renders them."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [int(t) for t in hf_tokenizer.encode(text.split(marker)[0], add_special_tokens=False)]


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


def test_padding_puts_the_marker_on_a_block_boundary(hf_tokenizer: Any) -> None:
    def count(stable: str) -> int:
        return len(stable_ids(hf_tokenizer, lesson.chat_request(stable, "?", CACHE_MARKER)))

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
    run = [0, 90, 90, 90, 90, 90, 90, 90, 0]  # cached tokens per request: cold first, a miss last
    assert exactness_sample(run, 3) == [1, 4, 7]
    assert exactness_sample(run, 1) == [7]
    assert exactness_sample(run, 20) == [1, 2, 3, 4, 5, 6, 7]
    assert exactness_sample(run, 0) == list(range(9))
    assert exactness_sample([0, 0], 3) == [0, 1]  # nothing warm: check them all
    assert lesson.settings_from(lesson_args()).exactness_checks == lesson.DEFAULT_EXACTNESS_CHECKS
    assert lesson.settings_from(lesson_args("--quick")).exactness_checks == 0
    with pytest.raises(UserError, match="--exactness-checks must be 0 \\(all\\) or more, got -1"):
        lesson.settings_from(lesson_args("--exactness-checks", "-1"))


# --------------------------------------------------------------------------- on the engines


@pytest.fixture(scope="module")
def manual(model_path: str) -> ManualCacheEngine:
    return ManualCacheEngine(model_path)


@pytest.fixture(scope="module")
def quick_result(engine: OfflineBackend, manual: ManualCacheEngine) -> lesson.BoundaryResult:
    return lesson.run(engine, lesson_args("--quick", "--check-tokens", "4"), manual=manual)


@pytest.mark.engine
def test_no_caching_reuses_nothing(quick_result: lesson.BoundaryResult) -> None:
    wrong = quick_result.variant("wrong")
    assert len(wrong.requests) == lesson.QUICK_QUESTIONS + 1
    assert all(r.cached_tokens == 0 == r.predicted_cached_tokens for r in wrong.requests)
    # Not 0 by luck: the same prompts on the same engine with reads on share the stable part.
    assert all(r.cached_tokens > 0 for r in quick_result.variant("apc").requests[1:])
    assert quick_result.no_caching_counters == PrefixCounters(queries=0, hits=0)


@pytest.mark.engine
def test_manual_breakpoint_reuses_the_stable_part_after_the_first_request(
    quick_result: lesson.BoundaryResult, hf_tokenizer: Any
) -> None:
    built = lesson.build_requests(lesson.QUICK_QUESTIONS, True, CACHE_MARKER, misuse=True)
    stable = len(stable_ids(hf_tokenizer, built.requests[0]))
    right = quick_result.variant("right")
    questions = [r for r in right.requests if r.extra["request"] == "question"]
    assert questions[0].cached_tokens == 0
    for record in questions[1:]:
        assert record.cached_tokens == record.predicted_cached_tokens == stable, record
        assert record.first_divergence == stable
    assert all(r.prediction_ok for r in right.requests)
    exactness = quick_result.exactness
    assert exactness.all_identical is True
    assert exactness.requests == exactness.of_requests == len(right.requests)
    assert all(r.extra["identical_to_full_recompute"] for r in right.requests)
    assert quick_result.same_prompt_tokens is True
    memory = quick_result.kv_memory
    assert memory.size.ok is True
    assert memory.size.measured_bytes == stable * 46_080


@pytest.mark.engine
def test_apc_cached_tokens_equal_the_prediction_and_alignment_reaches_the_marker(
    quick_result: lesson.BoundaryResult,
) -> None:
    for name in ("apc", "apc_aligned"):
        variant = quick_result.variant(name)
        assert all(r.prediction_ok for r in variant.requests), name
        assert variant.counters_agree() is True, name
    marker = quick_result.alignment
    stable = marker.marker_at_token
    assert marker.apc_cached_on_hits == [BLOCK * (stable // BLOCK)]  # the last partial block is lost
    assert marker.aligned_marker_at_token % BLOCK == 0
    assert marker.aligned_cached_on_hits == [marker.aligned_marker_at_token]
    aligned = quick_result.variant("apc_aligned").requests
    assert aligned[0].extra["request"] == "pre-warm" and aligned[0].cached_tokens == 0
    assert aligned[1].cached_tokens == marker.aligned_marker_at_token  # the first question hits


@pytest.mark.engine
def test_misuse_is_a_miss_flagged_at_the_exact_token(
    quick_result: lesson.BoundaryResult, hf_tokenizer: Any
) -> None:
    built = lesson.build_requests(lesson.QUICK_QUESTIONS, True, CACHE_MARKER, misuse=True)
    normal, broken = (stable_ids(hf_tokenizer, r) for r in (built.requests[0], built.requests[-1]))
    expected = first_difference(normal, broken)
    assert hf_tokenizer.decode(broken[:expected]).endswith("Reference documents")
    record = quick_result.variant("right").requests[-1]
    assert record.extra["request"] == "misuse"
    assert record.cached_tokens == 0 == record.predicted_cached_tokens
    assert record.first_divergence == expected
    flag = f"first divergence at token {expected} of {len(broken)}"
    assert any(flag in warning for warning in record.extra["warnings"])
    misuse = quick_result.misuse
    assert misuse is not None and misuse.to_json()["divergence_index"] == expected
    # APC keeps the whole blocks before the change; the breakpoint engine loses all of it.
    assert misuse.cached_tokens["apc"] == BLOCK * (expected // BLOCK)


@pytest.mark.engine
def test_json_contract(quick_result: lesson.BoundaryResult) -> None:
    data = json.loads(json.dumps(quick_result.to_json()))
    validate("lesson", data)
    assert data["example"] == "manual_cache_boundary"
    assert [v["name"] for v in data["variants"]] == ["wrong", "right", "apc", "apc_aligned"]
    assert data["comparison"]["hit_rate_wrong"] == 0.0
    assert data["comparison"]["hit_rate_right"] > 0.5
    assert data["comparison"]["prediction_matches"] is True
    assert set(data["ttft_speedup_vs_no_caching"]) == {"wrong", "right", "apc", "apc_aligned"}
    # Every variant's figures over the same requests: the questions and the misuse, no pre-warm.
    same = data["same_requests"]["variants"]
    assert set(same) == {"wrong", "right", "apc", "apc_aligned"}
    assert {v["requests"] for v in same.values()} == {lesson.QUICK_QUESTIONS + 1}
    assert same["apc_aligned"]["prompt_tokens"] < data["variants"][3]["summary"]["prompt_tokens"]
    # The same-engine ratio: transformers with and without the stored prefix, over the same
    # requests (quick mode checks every one, so its stored-prefix side is RIGHT's own median).
    engine_ratio = data["same_engine_speedup"]
    assert engine_ratio["requests"] == list(range(lesson.QUICK_QUESTIONS + 1))
    assert engine_ratio["stored_prefix_ttft_ms_median"] == same["right"]["ttft_ms_median"]


@pytest.mark.engine
def test_auto_boundary_places_the_marker_where_the_questions_differ(
    quick_result: lesson.BoundaryResult, manual: ManualCacheEngine, model_path: str, hf_tokenizer: Any
) -> None:
    """--auto-boundary: the span detector's marker sits at the start of the question (after the
    chat template's turn change), so it keeps more than the hand-placed one; the engine agrees."""
    from harness.manual_cache import BreakpointBackend

    settings = lesson.settings_from(lesson_args("--quick", "--check-tokens", "4", "--auto-boundary"))
    plain = lesson.build_requests(settings.questions, True, settings.marker, settings.misuse)
    measured, found = lesson.measure_auto_boundary(
        settings, plain, BreakpointBackend(manual, "m"), model_path
    )
    by_hand = quick_result.alignment.marker_at_token
    # the hand-placed marker ends the system message; the found one also keeps "<|im_end|>\n",
    # "<|im_start|>" and "user\n", the template's tokens before the question
    turn_change = 1 + 1 + 1 + len(hf_tokenizer.encode("user\n", add_special_tokens=False))
    assert (found.message_index, found.offset) == (1, 0)
    assert found.stable_tokens == by_hand + turn_change
    assert all(r.cached_tokens == r.predicted_cached_tokens for r in measured.result.requests)
    hand = next(v for v in quick_result.compared if v.name == "right").summary()
    assert measured.compared().summary()["hit_rate"] > hand["hit_rate"]
