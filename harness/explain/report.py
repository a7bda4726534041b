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

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import outputs
from harness.explain.analyze import SHARED, RequestExplanation
from harness.explain.costs import LogCost
from harness.explain.formats import ChatRequest, SkippedLine
from harness.explain.spans import Suggestion, VolatileSpan
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
    costs: Sequence[LogCost] = (),
    spans: Sequence[VolatileSpan] = (),
    suggestion: Suggestion | None = None,
) -> dict[str, Any]:
    """The ``--json`` document. ``tool`` marks it as ours (``--json`` overwrites only those)."""
    rows = [e.to_json() for e in explanations]
    for i, row in enumerate(rows):
        if costs:
            row["providers"] = {
                c.provider_model: {
                    "cached_tokens": c.usages[i].cached_tokens,
                    "cache_write_tokens": c.usages[i].cache_write_tokens,
                    "prompt_tokens": c.usages[i].prompt_tokens,
                    "cost_usd": c.usages[i].cost_usd,
                    "cost_if_extended_usd": c.usages[i].cost_if_extended_usd,
                    "approximate": c.usages[i].approximate,
                    "notes": list(c.usages[i].notes),
                }
                for c in costs
            }
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
        "cost": {c.provider_model: c.to_json() for c in costs},
        "volatile_spans": [span.to_json() for span in spans],
        "suggestion": suggestion.to_json() if suggestion is not None else None,
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


def _console() -> Any:
    """stdout, 140 columns when it is not a terminal: the request table's rows stay whole."""
    from harness.console import new_console

    return new_console(off_terminal_width=140)


def print_report(
    explanations: Sequence[RequestExplanation],
    model: str,
    block_size: int,
    verified: Sequence[VerifiedRequest] | None = None,
    console: Any = None,
    scope: str = SHARED,
    costs: Sequence[LogCost] = (),
    spans: Sequence[VolatileSpan] = (),
) -> None:
    """A table with one row per request, then a short detail block per break."""
    from rich.table import Table
    from rich.text import Text

    console = console or _console()
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
    if spans:
        console.print(spans_table(spans))
    if costs:
        console.print(cost_table(costs))
        for c in costs:
            if c.assumption:
                console.print(Text(f"{c.provider_model}: {c.assumption}", style="dim"))
    if verified is not None:
        bad = disagreements(explanations, verified)
        if bad:
            console.print(Text(f"the engine disagrees with the prediction on lines {bad}", style="bold red"))
        else:
            console.print(
                Text(f"the engine agrees with the prediction on all {len(verified)} requests", style="green")
            )


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.4f}"


def cost_table(costs: Sequence[LogCost]) -> Any:
    """The log priced per provider: tokens read from cache, dollars spent, dollars lost to breaks."""
    from rich.table import Table

    table = Table(title="the same log under each provider's caching rules (--provider)", title_justify="left")
    for name in (
        "provider:model",
        "prompt",
        "cached",
        "written",
        "hit",
        "spent",
        "lost to breaks",
        "by cause",
    ):
        table.add_column(name, justify="left" if name in ("provider:model", "by cause") else "right")
    for c in costs:
        data = c.to_json()
        prompt = data["prompt_tokens"]
        causes = ", ".join(
            f"{k} {_usd(v)}" for k, v in sorted(c.lost_by_cause.items(), key=lambda kv: -kv[1])
        )
        table.add_row(
            c.provider_model + (" ~" if c.approximate else ""),
            f"{prompt:,}",
            f"{data['cached_tokens']:,}",
            f"{data['cache_write_tokens']:,}",
            f"{data['cached_tokens'] / prompt:.0%}" if prompt else "-",
            _usd(c.spent_usd),
            _usd(c.lost_to_breaks_usd),
            causes,
        )
    table.caption = "~ token counts approximate (no offline tokenizer); n/a: no price in the table (--prices)"
    return table


def spans_table(spans: Sequence[VolatileSpan], top: int = 5) -> Any:
    """The volatile spans, most tokens lost first: what to move out of the stable prefix."""
    from rich.table import Table

    table = Table(
        title="volatile spans: what changes inside the prefix, most tokens lost first", title_justify="left"
    )
    for name in ("session", "first line", "where", "tokens", "kind", "text", "lost", "times", "fix"):
        table.add_column(name, justify="right" if name in ("first line", "lost", "times") else "left")
    for span in spans[:top]:
        where = "-" if span.message_index is None else f"msg {span.message_index}"
        table.add_row(
            span.session_id or "-",
            str(span.line),
            where,
            f"{span.start_token}-{span.end_token}",
            span.kind,
            _visible(span.text, 28, keep="start"),
            str(span.tokens_lost),
            str(span.occurrences),
            span.fix,
        )
    if len(spans) > top:
        table.caption = f"{len(spans) - top} more in --json (volatile_spans)"
    return table


def print_suggestion(s: Suggestion, console: Any = None) -> None:
    """--suggest: the top fix, on one real request, before and after."""
    from rich.text import Text

    console = console or _console()
    span = s.span
    console.print(
        Text(
            f"suggestion: the {span.kind} span of session {span.session_id or '-'} "
            f"(first at line {span.line}, token {span.start_token}) cost {span.tokens_lost} cached "
            f"tokens over {span.occurrences} request(s)",
            style="bold",
        )
    )
    for provider, usd in sorted(span.usd_lost.items()):
        console.print(Text(f"  {provider}: ${usd:,.4f} lost to it"))
    console.print(Text(f"  fix    : {span.fix}"))
    console.print(Text(f"  before : {s.before_text!r}"))
    if s.applied:
        console.print(Text(f"  after  : {s.after_text!r}"))
        style = "green" if s.after_status in ("extends", "repeat") else "yellow"
        console.print(
            Text(
                f"  line {s.line}: {s.before_status}, {s.before_cached} of {s.prompt_tokens} cached -> "
                f"{s.after_status}, {s.after_cached} of {s.after_prompt_tokens} cached "
                "(the analysis run again on the fixed session)",
                style=style,
            )
        )
    else:
        console.print(Text("  (this body's format is not rewritten automatically: apply the fix by hand)"))
    b = s.breakpoints
    console.print(
        Text(
            f"  stable part: the first {b.stable_end} tokens; on vLLM (block {b.block_size}) pad it by "
            f"{b.pad_tokens} tokens to end on a block, or the last partial block is recomputed"
        )
    )
    console.print(Text(f"  // __CACHE_END__ marker: {b.marker}"))
    for place in b.anthropic:
        console.print(Text(f"  Anthropic cache_control: on {place}"))
