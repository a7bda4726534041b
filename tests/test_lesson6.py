"""Lesson 6: the tool set and the script, the builders, the constraint (compiled by xgrammar, as
vLLM does), the call checker, the tool list changing at a block boundary and inside one on the
engine, the lesson in quick mode on the engine and, briefly, against the shared server.

Token positions are found here by a plain loop over the rendered IDs, never by the harness
functions the lesson uses.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from typing import Any

import jsonschema
import pytest
from conftest import run_script, validate

import harness.masking as masking
import tool_masking_vs_removal as lesson
from harness.backend import OfflineBackend, RequestOptions, ServerBackend
from harness.explain.formats import OPENAI, ChatRequest
from harness.explain.render import ChatRenderer
from harness.scenario_tools import (
    GROUPS,
    STATES,
    STEPS,
    TOOLS,
    TOOLS_BY_NAME,
    group_of,
    state_changes,
    tool_name,
)
from harness.servers import ServerProcess
from harness.tool_calls import CALL_OPEN, call_text, check_call, constraint, prefill

BLOCK = 32
TEMPLATE = lesson.PROJECT_TEMPLATE.read_text()


def rendered(renderer: ChatRenderer, messages: list[dict[str, Any]], options: RequestOptions) -> list[int]:
    """A request as vLLM's server renders it (the renderer carries the template)."""
    fields = {k: v for k, v in options.chat_fields().items() if k != "chat_template"}
    return renderer.render(ChatRequest(0, {"messages": messages, **fields}, OPENAI, None)).token_ids


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# --------------------------------------------------------------------------- the agent and its task


def test_tool_set_has_real_schemas_in_prefixed_groups() -> None:
    names = [tool_name(t) for t in TOOLS]
    assert len(names) >= 24 and names == sorted(names) and len(set(names)) == len(names)
    assert GROUPS == ("browser", "file", "message", "shell")
    assert all(sum(group_of(n) == g for n in names) >= 4 for g in GROUPS)
    for tool in TOOLS:
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])


def test_script_is_consistent_with_its_states() -> None:
    """Every scripted call is to a tool its state allows, with arguments its schema accepts."""
    assert len(STEPS) >= 12
    assert state_changes(STEPS) == 11  # the README and the docstring quote it
    for step in STEPS:
        state = STATES[step.state]
        assert state.allows(step.tool), step
        jsonschema.validate(step.arguments, TOOLS_BY_NAME[step.tool]["function"]["parameters"])
        check = check_call(call_text(step.tool, step.arguments), TOOLS, state.allows, "stop")
        assert check.valid, check


def test_right_sends_one_byte_stable_tool_list_and_only_appends(tools_renderer: ChatRenderer) -> None:
    right = lesson.build_right(len(STEPS), template=TEMPLATE)
    assert all(r.options.tools == right[0].options.tools for r in right)
    ids = [rendered(tools_renderer, r.messages, r.options) for r in right[:4]]
    for earlier, later in zip(ids, ids[1:], strict=False):
        assert later[: len(earlier)] == earlier  # each prompt extends the previous one
    # The constraint differs per state; the prompt does not.
    assert len({json.dumps(r.options.structured_outputs) for r in right}) == len(STATES)


def test_wrong_tool_list_changes_with_the_state(tools_renderer: ChatRenderer) -> None:
    wrong = lesson.build_wrong(4, template=TEMPLATE)
    assert [r.state.name for r in wrong] == ["reply", "browse", "browse", "shell"]
    assert [r.tools_in_prompt for r in wrong] == [4, 12, 12, 10]
    ids = [rendered(tools_renderer, r.messages, r.options) for r in wrong]
    text = tools_renderer.decode(ids[1])
    for earlier, later, same_state in (
        (ids[0], ids[1], False),
        (ids[1], ids[2], True),
        (ids[2], ids[3], False),
    ):
        at = first_difference(earlier, later)
        if same_state:
            assert at == len(earlier)  # same state, same list: the prompt extends the previous one
            continue
        # A new state: the prompts part at the first tool's name, inside the system message.
        before = tools_renderer.decode(later[:at])
        assert before.endswith('<tools>\n{"type": "function", "function": {"name": "'), before[-80:]
        assert "<|im_end|>" not in before  # still in the first (system) message
    assert text.count('{"type": "function"') == 12


def test_a_return_to_a_state_finds_the_branch_of_its_last_visit(tools_renderer: ChatRenderer) -> None:
    """WRONG at step 7 is in 'shell' again (last there at step 4, 'edit' in between): its prompt
    extends step 4's prompt, every token of it, while it shares with step 6's (the request just
    before it) only the prompt before the tool list."""
    wrong = lesson.build_wrong(8, template=TEMPLATE)
    assert [r.state.name for r in wrong[3:8]] == ["shell", "shell", "edit", "edit", "shell"]
    ids = {i: rendered(tools_renderer, wrong[i].messages, wrong[i].options) for i in (4, 6, 7)}
    assert ids[7][: len(ids[4])] == ids[4]
    before_tools = tools_renderer.decode(ids[7][: first_difference(ids[6], ids[7])])
    assert before_tools.endswith('{"name": "') and before_tools.count('{"type": "function"') == 1


def test_prefill_ends_the_prompt_inside_the_assistant_message(tools_renderer: ChatRenderer) -> None:
    requests = lesson.build_prefill(3, template=TEMPLATE)
    ids = rendered(tools_renderer, requests[1].messages, requests[1].options)
    assert tools_renderer.decode(ids).endswith('<|im_start|>assistant\n<tool_call>\n{"name": "browser_')
    # The next request holds the scripted call (browser_navigate): the prefill is a token prefix of it.
    right = lesson.build_right(3, template=TEMPLATE)[2]
    nxt = rendered(tools_renderer, right.messages, right.options)
    assert nxt[: len(ids)] == ids


# --------------------------------------------------------------------------- the constraint and the checker


@pytest.fixture(scope="module")
def grammar_compiler(tokenizer: Any) -> Any:
    import xgrammar

    return xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer._tok))


def accepts(compiler: Any, spec: dict[str, Any], text: str) -> bool:
    """Does xgrammar (vLLM's default backend) let a reply be exactly ``text`` under ``spec``?"""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiler.compile_structural_tag(spec["structural_tag"]))
    return matcher.accept_string(text) and matcher.is_completed()


def test_constraint_accepts_exactly_the_allowed_calls(grammar_compiler: Any) -> None:
    spec = constraint(STATES["browse"].allowed(TOOLS))
    good = call_text("browser_navigate", {"url": "https://docs.orbit-cli.dev/install"})
    assert accepts(grammar_compiler, spec, good)
    assert accepts(grammar_compiler, spec, call_text("message_notify_user", {"text": "on it"}))
    assert not accepts(grammar_compiler, spec, call_text("shell_exec", {"session_id": "m", "command": "ls"}))
    assert not accepts(grammar_compiler, spec, call_text("browser_navigate", {"uri": "https://x"}))  # no url
    assert not accepts(grammar_compiler, spec, call_text("browser_scroll", {"direction": "sideways"}))  # enum
    assert not accepts(grammar_compiler, spec, "Sure! " + good)  # nothing before the call
    assert not accepts(grammar_compiler, spec, good[:-3])  # not finished


@pytest.mark.parametrize(
    ("text", "finish", "expected"),
    [
        (
            call_text("browser_navigate", {"url": "https://x"}),
            "stop",
            ("browser_navigate", True, True, True, ""),
        ),
        (
            call_text("shell_exec", {"session_id": "a", "command": "ls"}),
            "stop",
            ("shell_exec", True, False, False, "not allowed now"),
        ),
        (call_text("browser_go", {}), "stop", ("browser_go", True, False, False, "no such tool")),
        (
            call_text("browser_click", {"index": -1}),
            "stop",
            ("browser_click", True, True, False, "index: -1 is less than the minimum of 0"),
        ),
        (
            '<tool_call>\n{"name": "browser_navigate", "arguments": {"url": "https://',
            "length",
            ("browser_navigate", False, True, False, "cut by the budget"),
        ),
        (
            '<tool_call>\n{"name": "browser_navigate", "arguments": "{\\"url\\": \\"a\\"}"}',
            "stop",
            ("browser_navigate", True, True, True, ""),
        ),
        ("<tool_response>\nok", "stop", (None, False, False, False, "no tool call")),
        ("Sure, navigating now.", "length", (None, False, False, False, "cut by the budget, no call")),
    ],
)
def test_check_call(text: str, finish: str, expected: tuple[Any, ...]) -> None:
    check = check_call(text, TOOLS, STATES["browse"].allows, finish)
    assert (check.name, check.complete, check.allowed, check.arguments_valid, check.problem) == expected


def test_prefill_names_a_group() -> None:
    assert prefill("browser") == CALL_OPEN + "browser_"
    assert all(call_text(n, {}).startswith(prefill(group_of(n))) for n in map(tool_name, TOOLS))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--allowed", "nope"],
            "error: --allowed nope: no such state; the states are reply, browse, shell, edit",
        ),
        (["--allowed", "edit", "--steps", "4"], "error: --allowed edit: the first 4 steps are never in it"),
        (["--steps", "1"], "error: --steps must be between 2 and 15"),
        (["--call-tokens", "8"], "error: --call-tokens must be at least 16"),
    ],
)
def test_bad_flags_are_one_line_errors(argv: list[str], message: str) -> None:
    proc = run_script("tool_masking_vs_removal.py", *argv, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith(message), err
    assert "Traceback" not in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- the block edges, on the engine


def padded_pair(
    engine: OfflineBackend, offset: int
) -> tuple[list[dict[str, Any]], RequestOptions, RequestOptions, int]:
    """A chat and two tool lists that part at a token whose index is ``offset`` past a block
    boundary: the system prompt is padded one word at a time until it is."""
    tools = [TOOLS_BY_NAME["message_ask_user"], TOOLS_BY_NAME["message_notify_user"]]
    other = [TOOLS_BY_NAME["message_ask_user"], TOOLS_BY_NAME["message_send_file"]]
    for pad in range(2 * BLOCK):
        messages = [
            {"role": "system", "content": "You are a careful agent." + " ok" * pad},
            {"role": "user", "content": "Tell the user the build passed."},
        ]
        a = RequestOptions(tools=tools, chat_template=TEMPLATE)
        b = RequestOptions(tools=other, chat_template=TEMPLATE)
        at = first_difference(engine.render(messages, a), engine.render(messages, b))
        if at % BLOCK == offset:
            return messages, a, b, at
    raise AssertionError(f"no padding puts the change {offset} tokens past a block boundary")


@pytest.mark.engine
@pytest.mark.parametrize("offset", [0, 1, 17])
def test_tool_list_changing_at_and_inside_a_block(engine: OfflineBackend, offset: int) -> None:
    messages, a, b, at = padded_pair(engine, offset)
    assert engine.decode(engine.render(messages, b)[at : at + 1]) == "send"
    before = copy.deepcopy(messages)
    engine.start_variant()
    first = engine.generate(messages, options=a)
    second = engine.generate(messages, options=b)
    assert first.cached_tokens == 0
    # Every block before the one holding the change, and none after: at a boundary all `at`
    # tokens; inside a block the partial block before the change is computed again.
    assert second.cached_tokens == at - offset
    assert second.prompt_tokens == len(engine.render(messages, b))
    assert messages == before  # vLLM's rendering got a copy


# --------------------------------------------------------------------------- the lesson, quick


def quick_args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "quick": True,
        "steps": None,
        "allowed": None,
        "call_tokens": None,
        "cost_pairs": None,
        "model": None,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def check_quick_result(result: lesson.MaskingResult, steps: int) -> dict[str, Any]:
    data = json.loads(json.dumps(result.to_json()))
    validate("lesson", data)
    for v in data["variants"]:
        assert v["summary"]["requests"] == steps
        for r in v["requests"]:
            assert r["cached_tokens"] == r["predicted_cached_tokens"], (v["name"], r)
        assert v["engine_counters"]["agree_with_requests"] is True
    # WRONG: the state changes at request 1 (reply -> browse), a first visit: the prompt leaves
    # the previous one at the first tool's name, in the system message, and keeps only the
    # blocks before it.
    wrong, right = result.variant("wrong").requests, result.variant("right").requests
    (brk,) = result.breaks
    assert (brk.index, brk.states, brk.hint, brk.tool_position) == (
        1,
        ("reply", "browse"),
        "tools_changed",
        1,
    )
    assert brk.tools == ("message_ask_user", "browser_find_text")
    assert wrong[1].first_divergence == brk.leaves_previous_at
    assert brk.cached_tokens == wrong[1].cached_tokens == BLOCK * (brk.leaves_previous_at // BLOCK)
    assert (brk.cached_from, brk.return_visit) == (0, False)
    assert brk.computed == wrong[1].prompt_tokens - wrong[1].cached_tokens
    assert brk.computed > brk.computed_right == right[1].prompt_tokens - right[1].cached_tokens
    assert wrong[1].divergence is not None
    assert (wrong[1].divergence.previous_token, wrong[1].divergence.token) == ("message", "browser")
    assert result.explainer_agrees
    work = {w.name: w for w in result.work}
    # The second request is WRONG's state change: it computes the tool list and all after it again.
    assert work["wrong"].computed_warm == brk.computed > work["right"].computed_warm
    assert work["right"].computed_warm == right[1].prompt_tokens - right[1].cached_tokens
    blocks = {f.name: f.blocks for f in result.footprints}
    assert all(f.bounded_blocks == result.footprints[0].bounded_blocks for f in result.footprints)
    assert blocks["wrong"] > 0 and blocks["right"] > 0
    # RIGHT, PREFILL, FULL: every request extends what the previous one left (its prompt, and the
    # generated tokens it shares with the scripted call; each prefill is the start of that call).
    for name in ("right", "prefill", "full"):
        records = result.variant(name).requests
        for previous, record in zip(records, records[1:], strict=False):
            assert record.first_divergence >= previous.prompt_tokens, (name, record)
    # The constraint: every call names an allowed tool, and every call it let finish is valid.
    # A reply the budget cut is still the start of such a call (its name may be spelled in odd
    # tokens: the mask allows any tokens that write the allowed text).
    right = result.validity_of("right")
    assert right.finished_valid
    for record in result.variant("right").requests:
        assert record.reply is not None
        state = STATES[record.extra["state"]]
        if record.extra["call"] is not None:
            assert state.allows(record.extra["call"])
        else:
            assert record.reply.finish_reason == "length"
            assert any(
                call_text(tool_name(t), {}).startswith(record.reply.text) for t in state.allowed(TOOLS)
            ), record.reply.text
    # The prefill: the call is in the prefilled group whatever the model wrote next.
    for record in result.variant("prefill").requests:
        assert (
            record.extra["call"] is None
            or group_of(record.extra["call"]) == STATES[record.extra["state"]].prefill_group
        )
    ways = {e.way: e for e in result.enforcement}
    assert set(ways) == {"grammar", "prefill", "allowed_token_ids"}
    assert ways["allowed_token_ids"].output_tokens == 1 and ways["allowed_token_ids"].allowed_start
    assert data["validity"]["enforcement"]["state"] == "browse"
    return data


@pytest.mark.engine
def test_quick_lesson_on_the_engine(
    engine: OfflineBackend, tools_renderer: ChatRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(masking, "tools_renderer", lambda model, template: tools_renderer)
    result = lesson.run(engine, quick_args())
    data = check_quick_result(result, lesson.QUICK_STEPS)
    assert result.template == "chatml_tools.jinja"  # SmolLM2's own template ignores tools
    assert [c.state for c in result.compiles] == ["reply", "browse"]
    assert data["validity"]["constraint_cost"]["pairs"] == lesson.QUICK_COST_PAIRS
    pair = result.cost.pairs[0]
    assert pair.tokens >= 8 and pair.ms_per_token_constrained > 0 and pair.ms_per_token_unconstrained > 0


def server_backend(server: ServerProcess) -> ServerBackend:
    return ServerBackend(server.url, api_key=server.credentials)  # the shared server wants its key


@pytest.mark.engine
def test_quick_lesson_against_the_server(
    vllm_server: ServerProcess, tools_renderer: ChatRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same requests as server fields: tools, structured_outputs, continue_final_message,
    allowed_token_ids; the prompt and generated IDs from return_token_ids."""
    monkeypatch.setattr(masking, "tools_renderer", lambda model, template: tools_renderer)
    backend = server_backend(vllm_server)
    try:
        result = lesson.run(backend, quick_args(cost_pairs=0, call_tokens=24))
    finally:
        backend.close()
    assert result.engine.backend == "vllm-server"
    assert result.template == "the model's own"  # the server runs examples/chatml_tools.jinja
    check_quick_result(result, lesson.QUICK_STEPS)
    for record in result.variant("right").requests:
        assert record.reply is not None and record.reply.prompt_token_ids is not None
        assert record.reply.output_token_ids  # return_token_ids: the generated IDs came back
