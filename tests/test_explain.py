"""The cache-break explainer: exact token indices, cache predictions, hints, and the CLI's errors.

Expected token counts are worked out by hand from the ChatML layout (every message is
``<|im_start|>`` + ``role\\ncontent`` + ``<|im_end|>`` + ``\\n``; the generation prompt is
``<|im_start|>`` + ``assistant\\n``) and the tokenizer's own ``encode``, never from the functions
under test. No engine starts here; ``verify`` is tested against a fake backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from harness.backend import EngineInfo, Message, OfflineBackend, PrefixCounters, Reply
from harness.errors import UserError
from harness.explain import (
    ChatRequest,
    TemplateTokenizer,
    check_json_target,
    detect_hint,
    explain_requests,
    locate_token,
    message_spans,
    parse_request,
    read_requests,
    session_salt,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "agent_trace.jsonl"

SYSTEM = "You are a careful test agent. Follow the rules. Clock: 09:30:"
LATER_TEXT = " UTC. Answer in one short sentence, and never invent facts you cannot check."


@pytest.fixture(scope="module")
def tok(model_path: str) -> TemplateTokenizer:
    return TemplateTokenizer(model_path)


def message_tokens(tok: TemplateTokenizer, role: str, content: str) -> int:
    """Tokens one ChatML message takes: <|im_start|>, role\\ncontent, <|im_end|>, \\n."""
    return 1 + len(tok.encode(f"{role}\n{content}")) + 1 + 1


def generation_prompt_tokens(tok: TemplateTokenizer) -> int:
    return 1 + len(tok.encode("assistant\n"))


def cached_by_rule(prompt_len: int, common: int, block: int) -> int:
    """vLLM's rule written out again, independent of harness.prefix."""
    return block * (min(common, prompt_len - 1) // block)


def req(line: int, messages: list[Message], session: str | None = None) -> ChatRequest:
    return ChatRequest(line, messages, session)


def sys_msg(seconds: str) -> Message:
    return {"role": "system", "content": f"{SYSTEM}{seconds}{LATER_TEXT}"}


# --------------------------------------------------------------------------- token spans


def test_message_spans_match_chatml_layout(tok: TemplateTokenizer) -> None:
    messages = [
        sys_msg("05"),
        {"role": "user", "content": "List the files you changed."},
        {"role": "assistant", "content": "money.py and CHANGELOG.md"},
        {"role": "user", "content": "Thanks. Now run the tests."},
    ]
    sizes = [message_tokens(tok, m["role"], m["content"]) for m in messages]
    expected, start = [], 0
    for size in sizes:
        expected.append((start, start + size))
        start += size
    prompt = tok.render(messages)
    assert message_spans(tok, messages) == expected
    assert len(prompt) == start + generation_prompt_tokens(tok)
    assert locate_token(expected, 0) == 0
    assert locate_token(expected, sizes[0]) == 1
    assert locate_token(expected, start - 1) == 3
    assert locate_token(expected, start) is None  # the generation prompt


# --------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("block", [8, 32])
def test_timestamp_break_exact_index_and_cache(tok: TemplateTokenizer, block: int) -> None:
    user = {"role": "user", "content": "What changed in the billing service?"}
    first = [sys_msg("05"), user]
    second = [sys_msg("17"), user]
    # The seconds differ in their first digit ("0" vs "1"); digits are one token each, so the
    # shared prefix is <|im_start|> plus the tokens of "system\n" + SYSTEM.
    index = 1 + len(tok.encode("system\n" + SYSTEM))
    assert (
        tok.encode("system\n" + SYSTEM)
        == tok.encode(f"system\n{SYSTEM}17{LATER_TEXT}")[: index - 1]
    )
    len_first = (
        message_tokens(tok, "system", first[0]["content"])
        + message_tokens(tok, "user", user["content"])
        + generation_prompt_tokens(tok)
    )
    len_second = len_first  # same digit count

    out = explain_requests([req(1, first), req(2, second)], tok, block)
    assert [e.status for e in out] == ["cold", "break"]
    assert out[0].predicted_cached_tokens == 0
    e = out[1]
    assert e.prompt_tokens == len_second
    assert e.first_divergence == index
    assert e.message_index == 0 and e.role == "system"
    assert e.reference_line == 1
    assert e.predicted_cached_tokens == cached_by_rule(len_second, index, block)
    assert e.predicted_cached_tokens == block * (index // block)
    assert e.lost_tokens == cached_by_rule(len_second, len_first, block) - block * (index // block)
    assert e.divergence is not None
    assert (e.divergence.token, e.divergence.previous_token) == ("1", "0")
    assert e.divergence.before.endswith("09:30:")
    assert e.divergence.after.startswith("7 UTC.")
    assert e.hint is not None and e.hint.kind == "timestamp"


def test_break_in_a_later_message_names_it(tok: TemplateTokenizer) -> None:
    block = 16
    head = [
        sys_msg("05"),
        {"role": "user", "content": "Summarize the incident."},
        {"role": "assistant", "content": "The nightly build failed."},
    ]
    before = "Please check the parser"
    first = [*head, {"role": "user", "content": before + " module first."}]
    second = [*head, {"role": "user", "content": before + " tests first."}]
    head_tokens = sum(message_tokens(tok, m["role"], m["content"]) for m in head)
    index = head_tokens + 1 + len(tok.encode("user\n" + before))
    assert tok.encode("user\n" + before + " module")[:-1] == tok.encode("user\n" + before)

    out = explain_requests([req(1, first), req(2, second)], tok, block)
    e = out[1]
    assert e.status == "break"
    assert e.first_divergence == index
    assert (e.message_index, e.role) == (3, "user")
    assert e.predicted_cached_tokens == block * (index // block)
    assert e.divergence is not None
    assert (e.divergence.token, e.divergence.previous_token) == (" tests", " module")
    assert e.hint is None  # an ordinary change of words


def test_append_only_turn_extends_with_nothing_lost(tok: TemplateTokenizer) -> None:
    block = 32
    first = [sys_msg("05"), {"role": "user", "content": "Read money.py."}]
    second = [
        *first,
        {"role": "assistant", "content": '{"tool": "read_file"}'},
        {"role": "user", "content": "Tool result: 14 lines."},
    ]
    len_first = sum(message_tokens(tok, m["role"], m["content"]) for m in first) + (
        generation_prompt_tokens(tok)
    )
    len_second = sum(message_tokens(tok, m["role"], m["content"]) for m in second) + (
        generation_prompt_tokens(tok)
    )
    out = explain_requests([req(1, first), req(2, second)], tok, block)
    e = out[1]
    assert e.status == "extends"
    assert e.prompt_tokens == len_second
    # The first prompt's generation prompt is the second's assistant header: all of it is shared.
    assert e.first_divergence == len_first
    assert (e.message_index, e.role) == (2, "assistant")
    assert e.predicted_cached_tokens == block * (len_first // block)
    assert e.lost_tokens == 0
    assert e.hint is None


def test_new_user_turn_after_generation_prompt_breaks_at_role(tok: TemplateTokenizer) -> None:
    first = [sys_msg("05"), {"role": "user", "content": "Hello."}]
    second = [*first, {"role": "user", "content": "Are you there?"}]
    conversation = sum(message_tokens(tok, m["role"], m["content"]) for m in first)
    out = explain_requests([req(1, first), req(2, second)], tok, 8)
    e = out[1]
    # Both have <|im_start|> there; then "user" where the first had its generation prompt.
    assert e.status == "break"
    assert e.first_divergence == conversation + 1
    assert (e.message_index, e.role) == (2, "user")
    assert e.divergence is not None and e.divergence.token == "user"
    assert e.divergence.previous_token != "user"


def test_repeat_is_served_up_to_the_last_block(tok: TemplateTokenizer) -> None:
    messages = [sys_msg("05"), {"role": "user", "content": "Once more."}]
    length = sum(message_tokens(tok, m["role"], m["content"]) for m in messages) + (
        generation_prompt_tokens(tok)
    )
    out = explain_requests([req(1, messages), req(2, messages)], tok, 32)
    e = out[1]
    assert e.status == "repeat"
    assert e.first_divergence == length
    assert e.predicted_cached_tokens == 32 * ((length - 1) // 32)
    assert e.message_index is None and e.divergence is None
    assert e.lost_tokens == 0


def test_sessions_are_isolated(tok: TemplateTokenizer) -> None:
    messages = [sys_msg("05"), {"role": "user", "content": "Status?"}]
    length = len(tok.render(messages))
    requests = [
        req(1, messages, "a"),
        req(2, messages, "b"),  # same prompt, other session: cold
        req(3, messages, "a"),
        req(4, messages),  # the default session is a session of its own
        req(5, messages),
    ]
    out = explain_requests(requests, tok, 16)
    assert [e.status for e in out] == ["cold", "cold", "repeat", "cold", "repeat"]
    hit = 16 * ((length - 1) // 16)
    assert [e.predicted_cached_tokens for e in out] == [0, 0, hit, 0, hit]
    assert [e.reference_line for e in out] == [None, None, 1, None, 4]


def test_reference_is_the_most_recent_prompt_sharing_the_prefix(tok: TemplateTokenizer) -> None:
    user = {"role": "user", "content": "Go."}
    requests = [
        req(1, [sys_msg("05"), user]),
        req(2, [sys_msg("06"), user]),
        req(3, [sys_msg("07"), user]),
    ]
    out = explain_requests(requests, tok, 32)
    # All three share the same prefix up to the seconds; line 3 is compared with line 2.
    assert out[2].reference_line == 2
    assert out[2].divergence is not None and out[2].divergence.previous_token == "6"
    assert out[2].hint is not None and out[2].hint.kind == "timestamp"


def test_example_trace_shows_each_kind_of_break(tok: TemplateTokenizer) -> None:
    requests, skipped = read_requests(EXAMPLE)
    assert skipped == [] and 5 <= len(requests) <= 7
    out = explain_requests(requests, tok, 32)
    assert [e.status for e in out] == [
        "cold",
        "extends",
        "cold",
        "break",
        "extends",
        "break",
        "break",
    ]
    assert [e.hint.kind if e.hint else None for e in out] == [
        None,
        None,
        None,
        "timestamp",
        None,
        "json_key_order",
        "uuid",
    ]
    assert [e.message_index for e in out if e.is_break] == [0, 1, 0]
    for e in out:
        assert e.predicted_cached_tokens == cached_by_rule(e.prompt_tokens, e.first_divergence, 32)
        if e.status == "extends":
            assert e.predicted_cached_tokens / e.prompt_tokens > 0.8
    # The system prompt is a few hundred tokens and the timestamp sits near its top.
    assert out[3].first_divergence < 128 < out[3].lost_tokens


# --------------------------------------------------------------------------- hints


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        (
            "Now: 2026-11-27 09:30:05 UTC. Be brief.",
            "Now: 2026-11-27 09:31:12 UTC. Be brief.",
            "timestamp",
        ),
        ("It is 14:05 here.", "It is 14:09 here.", "timestamp"),
        ("epoch=1795772405 ok", "epoch=1795772466 ok", "timestamp"),
        ("Today is 2026-11-27.", "Today is 2026-11-28.", "date"),
        ("Today is Friday, be nice.", "Today is Saturday, be nice.", "date"),
        (
            "request 3f2c9a1e-7b4d-4c2a-9e51-0d8f6b2a4c17 open",
            "request 9d41c7e2-05ab-4f3e-8c6d-2e7f1a9b3c58 open",
            "uuid",
        ),
        ("Turn 7 of this session.", "Turn 8 of this session.", "counter"),
        (
            'State: {"a": 1, "b": {"c": 2, "d": 3}} end',
            'State: {"b": {"d": 3, "c": 2}, "a": 1} end',
            "json_key_order",
        ),
        ('{"x": 1, "y": [1, 2]}', '{"y": [1, 2], "x": 1}', "json_key_order"),
        ('{"step": 3, "goal": "fix"}', '{"goal": "fix", "step": 4}', "json_key_order"),
        ('state {"a": 1, "b": 2}', 'state {"a":1,"b":2}', "json_serialization"),
    ],
)
def test_hint_fires(old: str, new: str, kind: str) -> None:
    hint = detect_hint(old, new)
    assert hint is not None and hint.kind == kind


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Fix the bug in the parser module.", "Fix the bug in the lexer module."),
        ("At 09:30 fix the parser.", "At 09:30 fix the lexer."),  # a time nearby, not changed
        ('Call {"tool": "read"} now', 'Call {"tool": "edit"} now'),  # JSON with a changed value
        ("version 3.91 released", "version 4.07 released"),  # a decimal is not a counter
        ("same text", "same text"),
    ],
)
def test_hint_stays_quiet(old: str, new: str) -> None:
    assert detect_hint(old, new) is None


# --------------------------------------------------------------------------- parsing


def test_parse_accepts_openai_bodies() -> None:
    line = json.dumps(
        {
            "model": "x",
            "max_tokens": 5,
            "session_id": 7,
            "messages": [{"role": "user", "content": "hi", "name": "dana"}],
        }
    )
    request = parse_request(line, 4)
    assert request == ChatRequest(4, [{"role": "user", "content": "hi"}], "7")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "hi"}', 'no "messages" list'),
        ('{"messages": []}', '"messages" is empty'),
        ('{"messages": [{"content": "hi"}]}', 'message 0 has no "role" string'),
        ('{"messages": [{"role": "user", "content": ["a"]}]}', 'message 0 (user) has no "content"'),
        ('{"messages": [{"role": "user", "content": "a"}], "session_id": [1]}', '"session_id"'),
    ],
)
def test_parse_rejects_malformed_lines(text: str, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        parse_request(text, 9)
    assert str(info.value).startswith("line 9: ")
    assert fragment in str(info.value)
    assert info.value.exit_code == 2


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hello there."}]})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "harness.explain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    "bad", ['{"messages": [', '{"messages": "hi"}', '{"messages": [{"role": 1}]}']
)
def test_cli_malformed_line_is_one_line_error(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{bad}\n{{also bad\n")
    result = run_cli(str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "line 2:" in lines[0] and "line 3" not in lines[0]  # stops at the first bad line
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_missing_file(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'nope.jsonl'}"]


def test_cli_skip_bad_goes_on(tmp_path: Path, model_path: str) -> None:
    path = tmp_path / "mixed.jsonl"
    other = json.dumps({"messages": [{"role": "user", "content": "Hello there, again."}]})
    path.write_text(f"{GOOD}\n{{broken\n\n{other}\n")
    out = tmp_path / "out.json"
    result = run_cli(str(path), "--skip-bad", "--json", str(out), "--model", model_path)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "line 2:" in result.stderr
    assert "Traceback" not in result.stderr
    document = json.loads(out.read_text())
    assert document["tool"] == "harness.explain"
    assert [r["line"] for r in document["requests"]] == [1, 4]
    assert [s["line"] for s in document["skipped"]] == [2]
    assert document["block_size"] == 32
    keys = {
        "line",
        "session_id",
        "prompt_tokens",
        "predicted_cached_tokens",
        "first_divergence",
        "message_index",
        "role",
        "before",
        "token",
        "after",
        "lost_tokens",
        "hint",
    }
    assert keys <= set(document["requests"][1])
    # Both prompts share the default system prompt and "Hello there" before they differ.
    assert document["requests"][1]["status"] == "break"
    assert document["requests"][1]["role"] == "user"


def test_json_target_guard(tmp_path: Path) -> None:
    check_json_target(tmp_path / "new.json")  # a new file is fine
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"tool": "harness.explain", "requests": []}))
    check_json_target(ours)  # an earlier result may be replaced
    for name, text in (("notes.txt", "my notes"), ("other.json", '{"example": "lesson1"}')):
        foreign = tmp_path / name
        foreign.write_text(text)
        with pytest.raises(UserError, match="refusing to overwrite"):
            check_json_target(foreign)
    with pytest.raises(UserError, match="does not exist"):
        check_json_target(tmp_path / "missing" / "out.json")


def test_cli_refuses_to_overwrite_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text(GOOD + "\n")
    foreign = tmp_path / "results.json"
    foreign.write_text('{"example": "stable_prefix_vs_timestamp"}')
    result = run_cli(str(path), "--json", str(foreign))
    assert result.returncode == 2
    assert result.stderr.startswith("error: refusing to overwrite")
    assert foreign.read_text() == '{"example": "stable_prefix_vs_timestamp"}'


def test_read_requests_empty_lines_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(f"\n{GOOD}\n\n")
    requests, skipped = read_requests(path)
    assert [r.line for r in requests] == [2] and skipped == []
    (tmp_path / "empty.jsonl").write_text("")
    result = run_cli(str(tmp_path / "empty.jsonl"))
    assert result.returncode == 2 and result.stderr.startswith("error: no requests in")


# --------------------------------------------------------------------------- verify (plumbing)


class FakeBackend:
    """A backend whose "engine" applies the block rule per cache_salt over characters.

    It checks the plumbing of ``verify`` (reset once, one salt per session, the engine's block
    size), not vLLM: the engine-backed check lives with the session-wide engine fixture.
    """

    def __init__(self, block_size: int, skew: int = 0) -> None:
        self.info = EngineInfo("fake", "fake", "cpu", block_size, "0")
        self.skew = skew  # tokens to add to every non-zero count (a lying engine)
        self.calls: list[tuple[str, str | None]] = []
        self._seen: dict[str | None, list[list[int]]] = {}

    def render(self, messages: Sequence[Message]) -> list[int]:
        return [ord(c) for m in messages for c in f"<{m['role']}>{m['content']}"] + [0]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    def start_variant(self) -> None:
        self.calls.append(("start", None))
        self._seen.clear()

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int = 1,
        cache_salt: str | None = None,
        read_cache: bool = True,
    ) -> Reply:
        self.calls.append(("generate", cache_salt))
        prompt = self.render(messages)
        seen = self._seen.setdefault(cache_salt, [])
        common = 0
        for earlier in seen:
            n = 0
            while n < min(len(prompt), len(earlier)) and prompt[n] == earlier[n]:
                n += 1
            common = max(common, n)
        cached = cached_by_rule(len(prompt), common, self.info.block_size)
        seen.append(prompt)
        return Reply(len(prompt), cached + (self.skew if cached else 0), 1.0, prompt, [1], "x")

    def counters(self) -> PrefixCounters | None:
        return None

    def close(self) -> None:
        pass


def fake_requests() -> list[ChatRequest]:
    base = {"role": "system", "content": "S" * 40}
    ask = {"role": "user", "content": "q"}
    return [
        req(1, [base, ask], "a"),
        req(2, [base, ask], "b"),
        req(3, [base, ask, {"role": "assistant", "content": "r"}, ask], "a"),
        req(4, [base, ask]),
        req(5, [base, ask]),
    ]


def test_verify_plumbing_with_fake_backend() -> None:
    backend = FakeBackend(block_size=4)
    rows = verify(fake_requests(), backend)
    assert backend.calls[0] == ("start", None)
    assert [c for c in backend.calls if c[0] == "start"] == [("start", None)]
    salts = [salt for kind, salt in backend.calls if kind == "generate"]
    assert salts == ["session-a", "session-b", "session-a", "no-session", "no-session"]
    assert session_salt(None) == "no-session" and session_salt("7") == "session-7"
    assert all(r.matches for r in rows)
    # "<system>" + 40 "S" + "<user>q" + end = 55 characters; block size 4 comes from the backend
    assert [r.predicted_cached_tokens for r in rows] == [0, 0, 52, 0, 52]
    assert [r.line for r in rows] == [1, 2, 3, 4, 5]


def test_verify_reports_a_disagreeing_engine() -> None:
    rows = verify(fake_requests(), FakeBackend(block_size=4, skew=4))
    assert [r.matches for r in rows] == [True, True, False, True, False]


@pytest.mark.engine
def test_verify_agrees_with_the_engine_on_the_example(engine: OfflineBackend) -> None:
    requests, skipped = read_requests(ROOT / "examples" / "agent_trace.jsonl")
    assert not skipped
    rows = verify(requests, engine)
    assert len(rows) == 7
    assert [r.engine_cached_tokens for r in rows] == [r.predicted_cached_tokens for r in rows]
    assert sum(r.engine_cached_tokens for r in rows) > 0
