"""Lesson 2: the builders, the key-order trap, and the lesson on the real engine in quick mode.

Token positions are worked out here from the ChatML layout and the tokenizer's own ``encode``
(every message is ``<|im_start|>`` + ``role\\ncontent`` + ``<|im_end|>`` + ``\\n``) and first
differences by a plain loop, never by the harness functions the lesson uses.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import pytest
from conftest import run_script, validate

import append_only_vs_inplace_edit as lesson
from harness.backend import ChatTokenizer, Message, OfflineBackend
from harness.scenario import TRACE, observation_text

BLOCK = 32


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def message_tokens(tokenizer: ChatTokenizer, message: Message) -> int:
    return 1 + len(tokenizer.encode(f"{message['role']}\n{message['content']}")) + 1 + 1


def counter_token(tokenizer: ChatTokenizer, quick: bool) -> int:
    """Index of the step counter's digit in a WRONG prompt: the system message, then
    <|im_start|> and the state message up to '"step": '."""
    messages = lesson.build_wrong(2, quick)[0]
    text = messages[1]["content"]
    upto = text[: text.index('"step": ') + len('"step": ')]
    return message_tokens(tokenizer, messages[0]) + 1 + len(tokenizer.encode("system\n" + upto))


def wrong_state(messages: list[Message]) -> dict[str, Any]:
    content = messages[1]["content"]
    assert content.startswith(lesson.STATE_HEADER)
    return dict(json.loads(content[len(lesson.STATE_HEADER) :]))


def logged_events(messages: list[Message]) -> list[dict[str, Any]]:
    """Every event line in the context, in order: the log message, then each tool result's tail."""
    texts = [messages[1]["content"].split("\n", 1)[1]]
    texts += [m["content"].split("\n\nState events:\n", 1)[1] for m in messages[4::2]]
    return [json.loads(line) for text in texts for line in text.splitlines()]


# --------------------------------------------------------------------------- builders


def test_right_requests_only_ever_grow(tokenizer: ChatTokenizer) -> None:
    right = lesson.build_right(lesson.MAX_STEPS)
    assert len(right) == lesson.MAX_STEPS
    for earlier, later in zip(right, right[1:], strict=False):
        assert later[: len(earlier)] == earlier  # every earlier message byte-identical
        assert len(later) == len(earlier) + 2
    ids = [tokenizer.render(r) for r in right]
    for earlier, later in zip(ids, ids[1:], strict=False):
        # Strictly a prefix, generation prompt included: in ChatML "<|im_start|>assistant\n" is
        # also how the next step's action message begins.
        assert later[: len(earlier)] == earlier


def test_right_is_rendered_again_from_events_with_the_same_bytes() -> None:
    assert lesson.build_right(6) == lesson.build_right(6)
    assert lesson.canonical_json({"b": 1, "a": {"y": 2, "x": 3}}) == lesson.canonical_json(
        {"a": {"x": 3, "y": 2}, "b": 1}
    )
    assert lesson.canonical_json({"b": 0.1 + 0.2, "a": "José"}) == '{"a":"Jos\\u00e9","b":0.3}'


def test_wrong_state_changes_a_few_tokens_into_the_state(tokenizer: ChatTokenizer) -> None:
    wrong = lesson.build_wrong(6)
    counter = counter_token(tokenizer, quick=False)
    ids = [tokenizer.render(r) for r in wrong]
    for step, (earlier, later) in enumerate(zip(ids, ids[1:], strict=False), 1):
        at = first_difference(earlier, later)
        assert at == counter
        assert (tokenizer.decode(earlier[at : at + 1]), tokenizer.decode(later[at : at + 1])) == (
            str(step - 1),
            str(step),
        )
    # The status edits also rebuild records: the finished task's keys come out in another order.
    first, second = wrong_state(wrong[0]), wrong_state(wrong[1])
    started = ["status", "updated_at", "id", "title", "tool", "attempts", "depends_on", "est_s", "result"]
    assert list(first["tasks"][0]) == started
    assert list(second["tasks"][0])[:4] == ["status", "attempts", "updated_at", "result"]


def test_both_variants_carry_the_same_information() -> None:
    for wrong, right in zip(
        lesson.build_wrong(lesson.MAX_STEPS), lesson.build_right(lesson.MAX_STEPS), strict=True
    ):
        assert lesson.replay(logged_events(right)) == wrong_state(wrong)
        assert [m["role"] for m in wrong] == [m["role"] for m in right]
        same = [0, 2, *range(3, len(wrong), 2)]  # system prompt, task, actions
        assert [wrong[i] for i in same] == [right[i] for i in same]
        for w, r in zip(wrong[4::2], right[4::2], strict=True):
            assert r["content"].startswith(w["content"] + "\n\nState events:\n")
    final = wrong_state(lesson.build_wrong(6)[-1])
    assert [t["status"] for t in final["tasks"]] == ["done"] * 5 + ["in_progress"] + ["pending"] * 6
    assert (final["step"], final["elapsed_s"], final["updated_at"]) == (5, 61.0, "2026-11-27T09:31:06Z")
    assert final["tasks"][4]["result"] == observation_text(TRACE[4]).splitlines()[1]


# --------------------------------------------------------------------------- the key-order trap


@pytest.mark.parametrize("quick", [False, True])
def test_key_order_trap_token_diff(tokenizer: ChatTokenizer, quick: bool) -> None:
    trap = lesson.key_order_trap(lesson.template_renderer(None), BLOCK, quick)
    state = lesson.initial_state(quick, "2026-11-27T09:30:05Z")
    moved = json.loads(json.dumps(state))
    task = moved["tasks"][1]
    moved["tasks"][1] = {"status": task.pop("status"), **task}
    before = tokenizer.render(lesson.context(lesson.STATE_HEADER + json.dumps(state), [], quick))
    after = tokenizer.render(lesson.context(lesson.STATE_HEADER + json.dumps(moved), [], quick))
    at = first_difference(before, after)
    assert trap.first_difference == at
    assert (tokenizer.decode(before[at : at + 1]), tokenizer.decode(after[at : at + 1])) == ("id", "status")
    assert tokenizer.decode(after[:at]).endswith('"result": null}, {"')
    assert trap.prompt_tokens == len(after) == len(before)
    assert trap.cached_same_text == BLOCK * ((len(before) - 1) // BLOCK)
    assert trap.cached_keys_moved == BLOCK * (at // BLOCK)
    assert (trap.data_equal, trap.canonical_text_equal, trap.hint) == (True, True, "json_key_order")
    assert [i for i, _, _ in trap.window] == list(range(at - 3, at + 4))


# --------------------------------------------------------------------------- on the engine


def quick_args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {"quick": True, "steps": None, "max_tokens": 1, "model": None}
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.engine
def test_quick_lesson_on_the_engine(engine: OfflineBackend) -> None:
    result = lesson.run(engine, quick_args())
    data = json.loads(json.dumps(result.to_json()))
    validate("lesson", data)
    wrong, right = (v["summary"] for v in data["variants"])
    for v in data["variants"]:
        assert v["summary"]["requests"] == lesson.QUICK_STEPS
        for r in v["requests"]:
            assert r["cached_tokens"] == r["predicted_cached_tokens"], (v["name"], r)
        assert v["engine_counters"]["agree_with_requests"] is True
    assert right["hit_rate"] > wrong["hit_rate"] + 0.3

    # WRONG leaves the cache at the step counter, a few tokens into the state JSON, every step.
    counter = counter_token(engine.tokenizer, quick=True)
    for record in result.variant("wrong").requests[1:]:
        assert record.first_divergence == counter
        assert record.cached_tokens == BLOCK * (record.first_divergence // BLOCK)
        assert record.extra == {
            "message_index": 1,
            "role": "system",
            "context_part": "state JSON",
            "hint": "counter",
        }
        assert record.divergence is not None and record.divergence.token == str(record.index)

    # RIGHT leaves it where the previous prompt ended: the start of the newest action.
    records = result.variant("right").requests
    for previous, record in zip(records, records[1:], strict=False):
        assert record.first_divergence == previous.prompt_tokens
        assert record.extra["context_part"] == f"step {record.index} action"
        assert record.cached_tokens == BLOCK * (previous.prompt_tokens // BLOCK)
    assert data["key_order_trap"]["data_equal"] is True
    assert data["example"] == "append_only_vs_inplace_edit"


@pytest.mark.parametrize("steps", ["0", "1", str(lesson.MAX_STEPS + 1)])
def test_steps_out_of_range_is_a_one_line_error(steps: str) -> None:
    proc = run_script("append_only_vs_inplace_edit.py", "--steps", steps)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith(f"error: --steps must be between 2 and {lesson.MAX_STEPS}"), err
    assert err.endswith(f"got {steps}")
    assert "Traceback" not in err and len(err.splitlines()) == 1
