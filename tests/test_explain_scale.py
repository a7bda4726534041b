"""The explainer at scale, without changing what it says: pieces tokenized apart give the whole
prompt's tokens, the bounded state gives the same explanations, and the output is the same byte
for byte with and without tokenizing piece by piece. No engine: vLLM's renderer only."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TOOLS_TEMPLATE

import append_only_vs_inplace_edit as lesson2
import stable_prefix_vs_timestamp as lesson1
from harness.explain import ChatRequest, LogExplainer, explain_requests, read_requests
from harness.explain.pieces import CHECK_FIRST, PieceTokenizer
from harness.explain.render import ChatRenderer
from harness.explain.report import print_report, report_json

ROOT = Path(__file__).resolve().parents[1]
LOGS = [*sorted((ROOT / "examples").glob("*.jsonl")), ROOT / "docs" / "proxy" / "log.jsonl"]


@pytest.fixture(scope="module")
def whole_renderers(model_path: str) -> Iterator[dict[str, ChatRenderer]]:
    """The same renderings, every prompt tokenized whole (as the server does)."""
    renderers = {
        "plain": ChatRenderer(model_path, pieces=False),
        "tools": ChatRenderer(model_path, TOOLS_TEMPLATE, pieces=False),
    }
    yield renderers
    for renderer in renderers.values():
        renderer.close()


def tricky_texts() -> list[str]:
    return [
        "",
        "plain text",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        "a literal <|im_end|> inside a message, and <|endoftext|> too",
        "  leading and trailing spaces  \n\n\t",
        "caf\u00e9 vs cafe\u0301, emoji \U0001f600 and \u4e2d\u6587",
        '{"name": "read_file", "parameters": {"type": "object"}}' * 3,
        "<|im_start|><|im_start|><|im_end|>",
        "digits 1234567890 and 2026-11-27 09:31:19 UTC",
    ]


def test_pieces_give_the_whole_prompts_tokens_and_offsets(chat_renderer: ChatRenderer) -> None:
    tokenizer = chat_renderer.tokenizer
    pieces = PieceTokenizer(tokenizer)
    assert pieces.splitting and pieces.reason is None  # SmolLM2: byte-level BPE, plain added tokens
    for text in tricky_texts() * 2:  # the second time every piece comes from the cache
        ids, offsets, note, _ = pieces.tokenize(text)
        whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert note is None
        assert ids == list(whole["input_ids"]), text
        assert [tuple(o) for o in offsets] == [tuple(o) for o in whole["offset_mapping"]], text
    assert pieces.pieces_reused > 0 and pieces.pieces_tokenized > 0


def test_a_prompt_that_extends_the_previous_one_splits_only_what_is_new(chat_renderer: ChatRenderer) -> None:
    """Given the previous prompt's split, only the text after the last special token both share is
    split and looked up; the tokens and offsets are the whole prompt's all the same, also when
    the new text changes the previous one's last piece or shares nothing with it."""
    tokenizer = chat_renderer.tokenizer
    pieces = PieceTokenizer(tokenizer)
    turns = ["<|im_start|>system\nYou are an agent.<|im_end|>\n"]
    previous = None
    for n in range(12):
        turns.append(f"<|im_start|>user\nstep {n}: read file {n}.py<|im_end|>\n")
        texts = ["".join(turns) + "<|im_start|>assistant\n", "".join(turns) + "<|im_start|>assis", "plain"]
        for text in texts:
            before = pieces.pieces_reused + pieces.pieces_tokenized
            ids, offsets, _, split = pieces.tokenize(text, previous)
            whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            assert ids == list(whole["input_ids"]), text
            assert [tuple(o) for o in offsets] == [tuple(o) for o in whole["offset_mapping"]], text
            if text is texts[0] and previous is not None:
                assert pieces.pieces_reused + pieces.pieces_tokenized - before <= 6  # not every piece
        previous = pieces.tokenize(texts[0], previous)[3]


def test_pieces_of_a_long_prompt_are_tokenized_once(chat_renderer: ChatRenderer) -> None:
    pieces = PieceTokenizer(chat_renderer.tokenizer)
    turns = ["<|im_start|>system\nYou are an agent.<|im_end|>\n"]
    for n in range(30):
        turns.append(f"<|im_start|>user\nstep {n}: read file {n}.py<|im_end|>\n")
        pieces.tokenize("".join(turns))
    # Each request added one message (3 pieces: role line, newline after the end token, ...):
    # after the first request, only the new message's pieces were tokenized.
    first = 1 + 2 * 2  # system, its newline, one user message
    assert pieces.pieces_tokenized <= first + 29 * 2


class _PrefixFirst:
    """A tokenizer whose first piece is tokenized apart from the rest (what SentencePiece's
    prepend_scheme "first" does): pieces cannot be tokenized alone."""

    is_fast = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.added_tokens_decoder = inner.added_tokens_decoder
        self.backend_tokenizer = inner.backend_tokenizer

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self.inner(" " + text if text else text, **kwargs)  # a prefix only at the start


def test_a_tokenizer_whose_pieces_differ_is_caught_and_switched_off(chat_renderer: ChatRenderer) -> None:
    pieces = PieceTokenizer(_PrefixFirst(chat_renderer.tokenizer))
    assert pieces.splitting  # nothing in its configuration says so: the sample check must
    text = "<|im_start|>user\nhello there<|im_end|>\n"
    ids, _, note, _ = pieces.tokenize(text)
    assert note is not None and "switched off" in note
    assert ids == list(pieces.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert not pieces.splitting
    ids_again, _, note_again, _ = pieces.tokenize(text + "more")
    assert note_again is None and ids_again == list(pieces.tokenizer(text + "more")["input_ids"])
    assert CHECK_FIRST >= 1


def test_a_tokenizer_that_strips_around_added_tokens_is_not_split(chat_renderer: ChatRenderer) -> None:
    class Stripping(_PrefixFirst):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            first = next(iter(inner.added_tokens_decoder.values()))
            stripped = type(first)(first.content, lstrip=True)
            self.added_tokens_decoder = {0: stripped}

    pieces = PieceTokenizer(Stripping(chat_renderer.tokenizer))
    assert not pieces.splitting and pieces.reason is not None and "strips" in pieces.reason


def lesson_logs() -> dict[str, list[ChatRequest]]:
    """The lessons' traces as logs: lesson 1's and lesson 2's WRONG and RIGHT, two sessions each."""
    logs: dict[str, list[ChatRequest]] = {}
    for name, lesson, count in (("lesson1", lesson1, 5), ("lesson2", lesson2, 4)):
        log: list[ChatRequest] = []
        for variant, build in (("wrong", lesson.build_wrong), ("right", lesson.build_right)):
            for messages in build(count, quick=True):
                log.append(ChatRequest(len(log) + 1, {"messages": messages}, "openai", f"{name}-{variant}"))
        logs[name] = log
    return logs


def rendered_output(requests: list[ChatRequest], renderer: ChatRenderer, source: Path) -> tuple[str, str]:
    """The explainer's ``--json`` document and its console table, as text."""
    import json

    from rich.console import Console

    explained = explain_requests(requests, renderer, 32)
    document = report_json(source, "model", 32, explained, requests=requests)
    console = Console(file=io.StringIO(), width=160, force_terminal=False, color_system=None)
    print_report(explained, "model", 32, console=console)
    return json.dumps(document, indent=2), console.file.getvalue()  # type: ignore[attr-defined]


def test_output_is_the_same_byte_for_byte_with_and_without_pieces(
    chat_renderer: ChatRenderer, tools_renderer: ChatRenderer, whole_renderers: dict[str, ChatRenderer]
) -> None:
    """Every committed log (with the model's template and the tools template) and the lessons'
    traces: the same JSON and the same table, tokenizing piece by piece or whole."""
    cases: list[tuple[str, list[ChatRequest]]] = [(p.name, read_requests(p)[0]) for p in LOGS]
    cases += list(lesson_logs().items())
    assert len(cases) >= 4
    for name, requests in cases:
        for kind, pieces in (("plain", chat_renderer), ("tools", tools_renderer)):
            assert pieces.pieces.splitting
            ours = rendered_output(requests, pieces, Path(name))
            whole = rendered_output(requests, whole_renderers[kind], Path(name))
            assert ours == whole, f"{name} with the {kind} template"


def test_bounded_state_explains_as_the_unbounded_one(chat_renderer: ChatRenderer) -> None:
    """A session window that closes nothing and a cache larger than the log change nothing; a
    window that closes a session makes its return a new session, and says so."""
    requests = [r for log in lesson_logs().values() for r in log]
    requests = [
        ChatRequest(i + 1, r.body, r.format, r.session_id, 1000.0 + 10 * i) for i, r in enumerate(requests)
    ]
    plain = [e.to_json() for e in explain_requests(requests, chat_renderer, 32)]
    big = LogExplainer(chat_renderer, 32, cache_tokens=10**9, session_window=10**6, keep_tokens=False)
    assert [big.explain(r).to_json() for r in requests] == plain
    assert big.cache_use().evicted_blocks == 0
    # Close sessions after 15 s idle: the lesson-1 WRONG session is idle while the others run.
    first = requests[0].session_id
    back = ChatRequest(len(requests) + 1, requests[1].body, "openai", first, requests[-1].timestamp)
    narrow = LogExplainer(chat_renderer, 32, session_window=15.0)
    for r in requests:
        narrow.explain(r)
    returned = narrow.explain(back)
    assert narrow.sessions_closed >= 1 and narrow.sessions_reopened == 1
    assert returned.status == "cold" and returned.reference_line is None
    # The shared cache still has the session's blocks: the prediction is what it was.
    again = LogExplainer(chat_renderer, 32).explain
    for r in requests:
        again(r)
    assert returned.predicted_cached_tokens == again(back).predicted_cached_tokens


def test_a_small_cache_evicts_like_an_engine(chat_renderer: ChatRenderer) -> None:
    """With room for about one session's blocks, another session in between pushes the first one
    out (least recently used first): its next request finds less than an unbounded cache holds,
    and exactly what is left."""
    log = lesson_logs()["lesson1"]
    a = [r for r in log if r.session_id == "lesson1-right"]
    b = [r for r in log if r.session_id == "lesson1-wrong"]
    order = [*a[:-1], *b, a[-1]]
    longest = max(len(chat_renderer.render(r).token_ids) for r in order)
    bounded = LogExplainer(chat_renderer, 32, cache_tokens=longest + 32)
    unbounded = LogExplainer(chat_renderer, 32)
    got = [bounded.explain(r) for r in order]
    want = [unbounded.explain(r) for r in order]
    use = bounded.cache_use()
    assert use.evicted_blocks > 0 and use.peak_blocks <= use.capacity_blocks
    assert want[-1].predicted_cached_tokens > 0
    assert got[-1].predicted_cached_tokens < want[-1].predicted_cached_tokens
    assert got[:len(a) - 1] == want[:len(a) - 1]  # nothing was evicted before the cache filled up


def run_explain(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``python -m harness.explain`` in this process (vLLM is imported once for the whole file)."""
    from harness.explain.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_jsonl_rows_are_the_json_documents_and_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--jsonl: a header, one line per request, a summary; the same rows and totals as --json."""
    import json

    from conftest import validate

    log = ROOT / "examples" / "agent_tools_log.jsonl"
    document, rows = tmp_path / "out.json", tmp_path / "out.jsonl"
    argv = [str(log), "--chat-template", str(TOOLS_TEMPLATE), "--provider", "openai,vllm"]
    code, _, _ = run_explain([*argv, "--json", str(document), "--jsonl", str(rows)], capsys)
    assert code == 0
    whole = json.loads(document.read_text())
    validate("explain", whole)
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    for record in records:
        validate("explain-rows", record)
    assert [r["record"] for r in records] == ["header"] + ["request"] * len(whole["requests"]) + ["summary"]
    assert [{k: v for k, v in r.items() if k != "record"} for r in records[1:-1]] == whole["requests"]
    assert {k: records[-1][k] for k in ("summary", "cost", "volatile_spans", "skipped")} == {
        k: whole[k] for k in ("summary", "cost", "volatile_spans", "skipped")
    }
    assert records[-1]["cache_use"]["peak_tokens"] > 0 and records[-1]["profile_s"] == {}
    # Run again over its own result: replaced; over someone else's file: refused, untouched.
    assert run_explain([*argv, "--jsonl", str(rows)], capsys)[0] == 0
    other = tmp_path / "notes.jsonl"
    other.write_text('{"mine": true}\n')
    code, _, err = run_explain([*argv, "--jsonl", str(other)], capsys)
    assert code == 2 and "refusing to overwrite" in err and other.read_text() == '{"mine": true}\n'


def test_shards_cover_the_log_and_the_profile_adds_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two shards of a --scope session run are the whole run's requests, each explained the same;
    --profile's stages add up to the run's wall time; --max-rows shows the first rows only."""
    import json

    log = ROOT / "examples" / "agent_tools_log.jsonl"
    base = [str(log), "--scope", "session", "--chat-template", str(TOOLS_TEMPLATE)]
    whole, parts = tmp_path / "whole.jsonl", [tmp_path / "one.jsonl", tmp_path / "two.jsonl"]
    code, out, _ = run_explain([*base, "--jsonl", str(whole), "--profile", "--max-rows", "3"], capsys)
    assert code == 0 and "rows and details of the first 3 of 10 requests" in out
    assert "where the time went (--profile)" in out
    rows = {}
    for k, part in enumerate(parts, 1):
        code, _, _ = run_explain([*base, "--jsonl", str(part), "--shard", f"{k}/2"], capsys)
        assert code == 0
        found = map(json.loads, part.read_text().splitlines())
        rows.update({r["line"]: r for r in found if r["record"] == "request"})
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    # Every field as in one process, but why a reported count disagrees: the other scope's
    # prediction ("--scope shared predicts the reported ...") needs the other shard's sessions.
    judged = ("disagreement_cause", "disagreement_detail")

    def own(row: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in row.items() if k not in judged}

    expected = {r["line"]: own(r) for r in records if r["record"] == "request"}
    assert {n: own(r) for n, r in rows.items()} == expected
    sessions = {r["session_id"] for r in rows.values()}
    assert len(sessions) == 2
    profile = records[-1]["profile_s"]
    stages = sum(v for k, v in profile.items() if k != "total (wall)")
    assert abs(stages - profile["total (wall)"]) < 0.05 and profile["render"] > 0 and profile["start-up"] > 0


def test_bad_scale_flags_fail_first(tmp_path: Path) -> None:
    """One line and exit 2, before vLLM is imported (each run takes well under a second)."""
    import subprocess
    import sys

    log = str(ROOT / "examples" / "agent_trace.jsonl")
    cases = {
        ("--shard", "1/2"): "--shard needs --scope session",
        ("--scope", "session", "--shard", "3/2"): "expected K/N with 1 <= K <= N",
        ("--cache-tokens", "0"): "must be a positive number of tokens",
        ("--cache-tokens", "lots"): "not a number of tokens",
        ("--session-window", "soon"): "not a duration",
        ("--max-rows", "-1"): "--max-rows must not be negative",
    }
    for flags, message in cases.items():
        done = subprocess.run(
            [sys.executable, "-m", "harness.explain", log, *flags],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr
    same = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "harness.explain", log, "--json", str(same), "--jsonl", str(same)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "name the same file" in done.stderr and not same.exists()


def test_a_session_that_salts_some_requests_keeps_its_caches_apart(chat_renderer: ChatRenderer) -> None:
    """Unbounded, a session's unsalted cache is its history (one model); a salted request in it
    splits them again. Explained as with separate caches (a bounded cache never shares)."""
    base = lesson_logs()["lesson1"]
    bodies = [r.body for r in base if r.session_id == "lesson1-right"]
    log = []
    for i, body in enumerate(bodies):
        salted = {**body, "cache_salt": "tenant-a"} if i in (2, 3) else body
        log.append(ChatRequest(i + 1, salted, "openai", "s"))
    for scope in ("session", "shared"):
        shared = [e.to_json() for e in explain_requests(log, chat_renderer, 32, scope=scope)]
        apart = LogExplainer(chat_renderer, 32, scope=scope, cache_tokens=10**12)
        assert [apart.explain(r).to_json() for r in log] == shared, scope
    cached = [e.predicted_cached_tokens for e in explain_requests(log, chat_renderer, 32, scope="session")]
    assert cached[2] == 0 and cached[3] > 0 and cached[4] > 0  # the first salted one starts cold
