"""What the explainer shows: one table row per request, a detail block per break, and ``--json``.

Columns of the table:

``prompt``    prompt tokens as the engine renders the request
``cached``    tokens the cache serves, predicted (whole blocks; the last prompt token never)
``engine``    the engine's own count (``--verify``), green when it equals ``cached``
``reported``  the count the log's response reported (``usage``), green when it equals ``cached``
``hit``       cached / prompt
``status``    ``cold`` first of its session · ``extends`` the previous prompt (and reply) is a
              prefix of this one: append-only, the good case · ``repeat`` this prompt is a
              prefix of an earlier one · ``break`` it changes a token its reference had
``diverges``  the first token not shared with the reference (the session's earlier prompt
              sharing the longest prefix)
``where``     the message (and role) holding that token
``lost``      tokens the cache would have served had the prompt extended its reference, minus
              those it serves: the price of the break
``hint``      what kind of value changed (timestamp, uuid, counter, json_key_order, tools_reordered, ...)
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import outputs
from harness.explain.analyze import SHARED, RequestExplanation
from harness.explain.formats import ChatRequest, SkippedLine
from harness.explain.verify import VerifiedRequest

TOOL_NAME = "harness.explain"
SCHEMA_VERSION = 2
SCOPE_MEANING = {
    SHARED: "one cache for all sessions (one vLLM server, no cache_salt)",
    "session": "a cache per session (cache_salt per session, or session-affine routing)",
}


def disagreements(
    explanations: Sequence[RequestExplanation], verified: Sequence[VerifiedRequest]
) -> list[int]:
    """Lines where the engine's cached tokens (or prompt length) differ from the prediction."""
    return [
        e.line
        for e, v in zip(explanations, verified, strict=True)
        if v.engine_cached_tokens != e.predicted_cached_tokens or v.prompt_tokens != e.prompt_tokens
    ]


def summary(explanations: Sequence[RequestExplanation]) -> dict[str, Any]:
    prompt = sum(e.prompt_tokens for e in explanations)
    cached = sum(e.predicted_cached_tokens for e in explanations)
    reconciled = [e.reconciliation for e in explanations if e.reconciliation is not None]
    lost_by_hint: dict[str, int] = {}  # what the breaks cost, by what broke them
    for e in explanations:
        if e.is_break:
            kind = e.hint.kind if e.hint is not None else "unexplained"
            lost_by_hint[kind] = lost_by_hint.get(kind, 0) + e.lost_tokens
    out: dict[str, Any] = {
        "requests": len(explanations),
        "prompt_tokens": prompt,
        "predicted_cached_tokens": cached,
        "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "breaks": sum(e.is_break for e in explanations),
        "lost_tokens": sum(e.lost_tokens for e in explanations),
        "lost_by_hint": lost_by_hint,
        "reply_tokens": sum(e.reply_tokens for e in explanations),
    }
    if reconciled:
        out["reported"] = {
            "requests": len(reconciled),
            "agree": sum(r.agrees for r in reconciled),
            "reported_cached_tokens": sum(r.reported_cached_tokens for r in reconciled),
            "causes": dict(Counter(r.cause for r in reconciled if r.cause is not None)),
        }
    return out


def report_json(
    source: Path,
    model: str,
    block_size: int,
    explanations: Sequence[RequestExplanation],
    skipped: Sequence[SkippedLine] = (),
    verified: Sequence[VerifiedRequest] | None = None,
    *,
    scope: str = SHARED,
    requests: Sequence[ChatRequest] = (),
    chat_template: str | None = None,
) -> dict[str, Any]:
    """The ``--json`` document. ``tool`` marks it as ours (``--json`` overwrites only those)."""
    rows = [e.to_json() for e in explanations]
    for row, request in zip(rows, requests, strict=False):
        row["format"] = request.format
    if verified is not None:
        for row, check in zip(rows, verified, strict=True):
            row["engine_cached_tokens"] = check.engine_cached_tokens
            row["engine_prompt_tokens"] = check.prompt_tokens
            row["engine_matches"] = check.matches
    return {
        "tool": TOOL_NAME,
        "schema_version": SCHEMA_VERSION,
        "source": str(source),
        "model": model,
        "chat_template": chat_template,
        "block_size": block_size,
        "scope": scope,
        "verified": verified is not None,
        "requests": rows,
        "skipped": [{"line": s.line, "error": s.error} for s in skipped],
        "summary": summary(explanations),
    }


def is_explain_result(document: Any) -> bool:
    return isinstance(document, dict) and document.get("tool") == TOOL_NAME


def check_json_target(path: Path) -> None:
    """Refuse an unwritable path, or to overwrite anything but an earlier result of this tool."""
    outputs.check_json_target("--json", path, is_explain_result, f"a {TOOL_NAME} result")


def write_json(path: Path, document: dict[str, Any]) -> None:
    check_json_target(path)
    outputs.write_json(path, document)


def _visible(text: str, width: int = 48, keep: str = "end") -> str:
    """``text`` quoted with its newlines escaped, clipped to ``width`` from the side that matters
    (the end of the text before a break, the start of the text after it)."""
    if len(text) > width:
        text = "…" + text[-(width - 1) :] if keep == "end" else text[: width - 1] + "…"
    return repr(text)


def _where(e: RequestExplanation) -> str:
    if e.status == "cold" and e.cached_from_line is not None:
        return f"shared with line {e.cached_from_line}"  # another session's blocks (--scope shared)
    if e.status == "cold" or e.first_divergence >= e.prompt_tokens:
        return "-"
    if e.message_index is None:
        return str(e.role)
    return f"msg {e.message_index} ({e.role})"


def print_report(
    explanations: Sequence[RequestExplanation],
    model: str,
    block_size: int,
    verified: Sequence[VerifiedRequest] | None = None,
    console: Any = None,
    scope: str = SHARED,
) -> None:
    """A table with one row per request, then a short detail block per break."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        import os

        # Not a terminal (a pipe, a CI log, a file): rich would wrap at 80 columns; keep rows whole.
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(highlight=False, width=140 if wide else None)
    reported = any(e.reconciliation is not None for e in explanations)
    title = f"prefix-cache explanation: {model}, block size {block_size}, scope {scope}"
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("line", "right"),
        ("session", "left"),
        ("prompt", "right"),
        ("cached", "right"),
        ("engine", "right"),
        ("reported", "right"),
        ("hit", "right"),
        ("status", "left"),
        ("diverges", "right"),
        ("where", "left"),
        ("lost", "right"),
        ("hint", "left"),
    ):
        if (name == "engine" and verified is None) or (name == "reported" and not reported):
            continue
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    checks = list(verified) if verified is not None else [None] * len(explanations)
    for e, check in zip(explanations, checks, strict=True):
        hit = e.predicted_cached_tokens / e.prompt_tokens if e.prompt_tokens else 0.0
        style = {"break": "bold red", "extends": "green", "repeat": "green"}.get(e.status, "")
        cells: list[Any] = [
            str(e.line),
            e.session_id if e.session_id is not None else "-",
            str(e.prompt_tokens),
            str(e.predicted_cached_tokens),
        ]
        if check is not None:
            ok = (
                check.engine_cached_tokens == e.predicted_cached_tokens
                and check.prompt_tokens == e.prompt_tokens
            )
            cells.append(Text(str(check.engine_cached_tokens), style="green" if ok else "bold red"))
        if reported:
            r = e.reconciliation
            cells.append(
                Text("-")
                if r is None
                else Text(str(r.reported_cached_tokens), style="green" if r.agrees else "bold red")
            )
        cells += [
            f"{hit:.0%}",
            Text(e.status, style=style),
            "-" if e.status == "cold" or e.first_divergence >= e.prompt_tokens else str(e.first_divergence),
            _where(e),
            str(e.lost_tokens) if e.lost_tokens else "-",
            e.hint.kind if e.hint is not None else "",
        ]
        table.add_row(*cells)
    console.print(table)
    console.print(Text(f"scope {scope}: {SCOPE_MEANING.get(scope, scope)} (--scope to change)", style="dim"))

    for e in explanations:
        if not e.is_break or e.divergence is None:
            continue
        d = e.divergence
        session = f" (session {e.session_id})" if e.session_id is not None else ""
        console.print(
            Text(
                f"line {e.line}{session}: breaks at token {e.first_divergence} of "
                f"{e.prompt_tokens}, in {_where(e)}; compared with line {e.reference_line}",
                style="bold",
            )
        )
        console.print(Text(f"  before : {_visible(d.before)}"))
        console.print(
            Text(
                f"  now    : {_visible(d.token)}   (line {e.reference_line} had {_visible(d.previous_token)})"
            )
        )
        console.print(Text(f"  after  : {_visible(d.after, keep='start')}"))
        console.print(
            Text(
                f"  cost   : {e.predicted_cached_tokens} of {e.prompt_tokens} tokens cached; "
                f"{e.lost_tokens} lost to this break ({e.lost_tokens // block_size} blocks "
                f"of {block_size})"
            )
        )
        if e.hint is not None:
            console.print(Text(f"  hint   : {e.hint.describe()}", style="yellow"))
    for e in explanations:
        r = e.reconciliation
        if r is not None and not r.agrees:
            console.print(
                Text(
                    f"line {e.line}: reported {r.reported_cached_tokens} cached, predicted "
                    f"{e.predicted_cached_tokens}: {r.cause}: {r.detail}",
                    style="yellow",
                )
            )
    if reported:
        s = summary(explanations)["reported"]
        style = "green" if s["agree"] == s["requests"] else "yellow"
        console.print(
            Text(
                f"the reported cached tokens agree with the prediction on {s['agree']} of "
                f"{s['requests']} requests with usage",
                style=style,
            )
        )
    if any(e.longer_than_context for e in explanations):
        long = [e.line for e in explanations if e.longer_than_context]
        console.print(
            Text(
                f"lines {long}: longer than the model's context: a vLLM server with this "
                "model would refuse them",
                style="yellow",
            )
        )
    if verified is not None:
        bad = disagreements(explanations, verified)
        if bad:
            console.print(Text(f"the engine disagrees with the prediction on lines {bad}", style="bold red"))
        else:
            console.print(
                Text(f"the engine agrees with the prediction on all {len(verified)} requests", style="green")
            )
