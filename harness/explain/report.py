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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import outputs
from harness.errors import UserError
from harness.explain.analyze import SHARED, CacheUse, RequestExplanation
from harness.explain.costs import LOCAL, UNKNOWN, LogCost, Loss
from harness.explain.diagnostics import Diagnosis
from harness.explain.formats import ChatRequest, SkippedLine
from harness.explain.origin import Origin
from harness.explain.provider_view import PieceChange
from harness.explain.reconcile import LOCAL as LOCAL_RENDERING
from harness.explain.reconcile import PROVIDER_TOLERANCE
from harness.explain.run import TOOL_NAME, Finished, RequestResult, Totals, ending, header
from harness.explain.spans import Suggestion, VolatileSpan
from harness.explain.verify import VerifiedRequest

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


def totals_of(
    explanations: Sequence[RequestExplanation],
    diagnoses: Sequence[Diagnosis] = (),
    verified: Sequence[VerifiedRequest] | None = None,
) -> Totals:
    by_line = {d.line: d for d in diagnoses}
    checks = list(verified) if verified is not None else [None] * len(explanations)
    totals = Totals()
    for e, check in zip(explanations, checks, strict=True):
        totals.add(e, by_line.get(e.line), check)
    return totals


def summary(explanations: Sequence[RequestExplanation]) -> dict[str, Any]:
    return totals_of(explanations).to_json()


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
    diagnoses: Sequence[Diagnosis] = (),
    origins: Sequence[Origin | None] = (),
) -> dict[str, Any]:
    """The ``--json`` document of a log held in memory (``run.JsonOutput`` streams the same one).
    ``tool`` marks it as ours (``--json`` overwrites only those)."""
    by_line = {d.line: d for d in diagnoses}
    checks = list(verified) if verified is not None else [None] * len(explanations)
    found = list(origins) or [None] * len(explanations)
    rows = []
    for i, (request, e) in enumerate(zip(requests, explanations, strict=True)):
        priced = {c.provider_model: c.priced[i] for c in costs}
        result = RequestResult(request, e, priced, found[i], by_line.get(e.line), checks[i])
        rows.append(result.row())
    totals = totals_of(explanations, diagnoses, verified)
    finished = Finished(totals, list(costs), list(spans), [])
    head = header(source, model, chat_template, block_size, scope, verified is not None)
    end = ending(skipped, finished, suggestion.to_json() if suggestion is not None else None)
    return {**head, "requests": rows, **end}


def is_explain_result(document: Any) -> bool:
    return isinstance(document, dict) and document.get("tool") == TOOL_NAME


def check_json_target(path: Path) -> None:
    """Refuse an unwritable path, or to overwrite anything but an earlier result of this tool."""
    outputs.check_json_target("--json", path, is_explain_result, f"a {TOOL_NAME} result")


def is_jsonl_result(first_line: bytes) -> bool:
    try:
        record = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("record") == "header" and is_explain_result(record)


def check_jsonl_target(path: Path) -> None:
    """The same for ``--jsonl``: an existing file is replaced only when its header line is ours."""
    target = outputs.writable_target("--jsonl", path)
    if target.exists() and target.stat().st_size:
        try:
            with target.open("rb") as handle:
                ours = is_jsonl_result(handle.readline())
        except OSError:
            ours = False
        if not ours:
            raise UserError(
                f"--jsonl {path} exists and is not a {TOOL_NAME} result: refusing to overwrite it (remove it "
                "or choose another name)"
            )


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
    diagnoses: Sequence[Diagnosis] = (),
    origins: Sequence[tuple[int, Origin]] = (),
    totals: Totals | None = None,
    beyond: int = 0,
) -> None:
    """A table with one row per request, then a short detail block per break (on the local
    rendering, then on each ``--provider``'s own reading of the bodies), reported usage, the
    providers' own diagnoses, volatile spans, costs.

    ``explanations``: the requests shown (a long log's first ones: ``run.Held``); ``totals``:
    the whole log's (default: of the requests shown); ``beyond``: how many more there were."""
    from rich.table import Table
    from rich.text import Text

    console = console or _console()
    totals = totals if totals is not None else totals_of(explanations, diagnoses, verified)
    reported = totals.reported > 0
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
    if beyond:
        console.print(
            Text(
                f"rows and details of the first {len(explanations):,} of {len(explanations) + beyond:,} "
                "requests; the totals below are the whole log's, and --json / --jsonl have every request",
                style="dim",
            )
        )
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
        priced = [(c, loss) for c in costs for loss in c.losses if loss.line == e.line and loss.same_as_local]
        if priced:
            reading = "its reading" if len(priced) == 1 else "each one's reading"
            console.print(Text(f"  priced : {_dollars(priced)} (the same change in {reading} of the body)"))
    print_provider_breaks(explanations, costs, model, console)
    print_origins(origins, console)
    for e in explanations:
        r = e.reconciliation
        if r is not None and not r.agrees:
            predicted = (
                f"predicted {e.predicted_cached_tokens}"
                if r.reconciled_with == LOCAL_RENDERING
                else f"under {r.reconciled_with}"
            )
            console.print(
                Text(
                    f"line {e.line}: reported {r.reported_cached_tokens} cached, {predicted}: "
                    f"{r.cause}: {r.detail}",
                    style="yellow",
                )
            )
    if reported:
        s = totals.reported_json()
        style = "green" if s["agree"] == s["requests"] else "yellow"
        held = {k: n for k, n in s["reconciled_with"].items() if k != LOCAL_RENDERING}
        by_provider = "".join(
            f"; {n} held to {k}'s rules (within {PROVIDER_TOLERANCE:.0%} of the prompt)"
            for k, n in held.items()
        )
        console.print(
            Text(
                f"the reported cached tokens agree with the prediction on {s['agree']} of "
                f"{s['requests']} requests with usage{by_provider}",
                style=style,
            )
        )
    print_diagnoses(diagnoses, totals, console)
    if totals.longer_than_context:
        long = totals.longer_than_context
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
    if totals.verified:
        bad = totals.engine_disagrees
        if bad:
            console.print(Text(f"the engine disagrees with the prediction on lines {bad}", style="bold red"))
        else:
            agree = f"the engine agrees with the prediction on all {totals.verified} requests"
            console.print(Text(agree, style="green"))


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.4f}"


def _dollars(priced: Sequence[tuple[LogCost, Loss]]) -> str:
    """ "$0.0021 under openai:gpt-4.1, ~$0.0035 under anthropic:claude-sonnet-5-5" """
    return ", ".join(
        f"{'~' if c.approximate else ''}{_usd(loss.usd)} under {c.provider_model}" for c, loss in priced
    )


def _names(names: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c" """
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _at(changes: Sequence[PieceChange]) -> str:
    """ "token 13 of 1,597 (openai:gpt-4.1, openai:gpt-6.2-sol); ~13 of ~1,562 (anthropic:...)" """
    places: dict[tuple[int | None, int | None, bool], list[str]] = {}
    for change in changes:
        key = (change.first_divergence, change.prompt_tokens, change.approximate)
        places.setdefault(key, []).append(str(change.provider_model))
    parts = []
    for (first, length, approximate), names in places.items():
        tilde = "~" if approximate else ""
        parts.append(f"{tilde}{first or 0:,} of {tilde}{length or 0:,} ({', '.join(names)})")
    return "token " + "; ".join(parts) + ", each in its own tokens"


def print_provider_breaks(
    explanations: Sequence[RequestExplanation], costs: Sequence[LogCost], model: str, console: Any
) -> None:
    """The breaks a provider's own reading of the bodies shows and the local rendering does not
    (or names otherwise), one block per change with every provider that read it so; then the
    dollars lost with nothing changed in the bodies (the provider's side)."""
    from rich.text import Text

    by_line = {e.line: e for e in explanations}
    groups: dict[tuple[int, str, str], list[tuple[LogCost, Loss, PieceChange]]] = {}
    for c in costs:
        for loss in c.losses:
            if loss.line not in by_line:
                continue  # a request the console does not show (a long log's later ones)
            if loss.change is not None and not loss.same_as_local:
                key = (loss.line, loss.cause, loss.change.headline())
                groups.setdefault(key, []).append((c, loss, loss.change))
    for (line, _cause, headline), found in sorted(groups.items(), key=lambda kv: kv[0][0]):
        change = found[0][2]
        e = by_line[line]
        readers = _names([c.provider_model for c, _, _ in found])
        verb = "reads" if len(found) == 1 else "read"
        session = f" (session {e.session_id})" if e.session_id is not None else ""
        console.print(
            Text(
                f"line {line}{session}: breaks in {change.where()}, as {readers} {verb} it: {headline}; "
                f"compared with line {change.reference_line}",
                style="bold",
            )
        )
        if e.is_break:
            console.print(
                Text(
                    f"  local  : the local rendering ({model}) breaks at token {e.first_divergence}, in "
                    f"{_where(e)}: {e.cause} (above)"
                )
            )
        else:
            console.print(
                Text(
                    f"  local  : no break in the local rendering ({model}): its chat template does not "
                    "render it"
                )
            )
        console.print(
            Text(f"  at     : {_at([ch for _, _, ch in found if ch.first_divergence is not None])}")
        )
        console.print(Text(f"  before : {_visible(change.before)}"))
        console.print(
            Text(
                f"  now    : {_visible(change.text, keep='start')}   "
                f"(line {change.reference_line} had {_visible(change.previous_text, keep='start')})"
            )
        )
        console.print(Text(f"  cost   : {_dollars([(c, loss) for c, loss, _ in found])}"))
        if change.hint is not None:
            console.print(Text(f"  hint   : {change.hint.describe()}", style="yellow"))
    for c in costs:
        for loss in c.losses:
            if loss.line not in by_line:
                continue
            if loss.cause == UNKNOWN:
                console.print(
                    Text(
                        f"line {loss.line}: {_usd(loss.usd)} lost under {c.provider_model} with nothing "
                        "changed in the bodies: the provider's side (an eviction, the TTL, routing), not "
                        "the agent",
                        style="yellow",
                    )
                )
            elif loss.cause == "cache_salt" and loss.found_by == LOCAL:
                reference = by_line[loss.line].reference_line
                console.print(
                    Text(
                        f"line {loss.line}: {_usd(loss.usd)} lost under {c.provider_model}: its cache_salt "
                        f"differs from line {reference}'s (vLLM keeps differently salted requests apart)",
                        style="yellow",
                    )
                )


def print_origins(origins: Sequence[tuple[int, Origin]], console: Any) -> None:
    """Which requests a hosted API answered, and what their reported usage is held to."""
    from rich.text import Text

    answered: dict[tuple[str | None, str], list[int]] = {}
    for line, origin in origins:
        if origin.provider is not None:
            answered.setdefault((origin.provider_model, origin.evidence), []).append(line)
    for (key, evidence), lines in answered.items():
        if key is None:
            text = (
                f"answered by {evidence}: {_lines(lines)} held to the local rendering, which renders "
                "another model"
            )
        else:
            text = (
                f"answered by {key} ({evidence}): the usage of {_lines(lines)} is held to "
                f"{key}'s own rules and token counts, not to this vLLM rendering"
            )
        console.print(Text(text, style="dim"))


def _lines(lines: Sequence[int]) -> str:
    """ "request 6", "requests 1-5", "requests [1, 3]" """
    if len(lines) == 1:
        return f"request {lines[0]}"
    run = list(lines) == list(range(lines[0], lines[-1] + 1))
    return f"requests {lines[0]}-{lines[-1]}" if run else f"requests {list(lines)}"


DIAGNOSIS_MEANING = {
    "baseline_not_found": "no record of the baseline there (an unknown id, or past its retention)",
    "unavailable": "the provider could not say (e.g. tool_choice or thinking changed)",
    "pending": "the comparison had not finished when the response was sent",
}


def diagnosis_worth_showing(d: Diagnosis) -> bool:
    """A miss the provider explains, or anything the explainer disagrees with (a hit, or nothing
    reported, that both sides agree on goes without a line)."""
    return d.outcome not in ("none_reported", "hit") or d.agrees is False


def diagnosis_line(d: Diagnosis, with_line: bool = True) -> str:
    """ "line 6: anthropic says tools_changed (~1,200 tokens missed), against line 5; the explainer
    finds tools (...): agree" (without "line 6: " when ``with_line`` is off)."""
    theirs = d.reason or d.outcome
    if d.missed_tokens is not None:
        theirs += f" (~{d.missed_tokens:,} tokens missed)"
    if d.outcome in DIAGNOSIS_MEANING:
        theirs += f": {DIAGNOSIS_MEANING[d.outcome]}"
    against = (
        f"line {d.baseline_line}" if d.baseline_line is not None else f"{d.baseline_id} (not in the log)"
    )
    ours = d.explainer_part or "-"
    if d.change is not None and d.explainer_part == d.change.part:
        reader = f", as {d.change.provider_model} reads it" if d.change.provider_model else ""
        ours += f" ({d.change.headline()}{reader})"
    if d.compared_with is not None and d.compared_with != d.baseline_line:
        ours += f", compared with line {d.compared_with}"
    verdict = {True: "agree", False: "DISAGREE", None: "nothing to compare"}[d.agrees]
    said = f"{d.provider} says {theirs}, against {against}; the explainer finds {ours}: {verdict}"
    return f"line {d.line}: {said}" if with_line else said


def print_diagnoses(diagnoses: Sequence[Diagnosis], totals: Totals, console: Any) -> None:
    """The providers' own reasons for a miss next to the explainer's, and how often they agree."""
    from rich.text import Text

    if not diagnoses:
        return
    for d in filter(diagnosis_worth_showing, diagnoses):
        console.print(Text(diagnosis_line(d), style="yellow" if d.agrees is False else ""))
    console.print(Text(diagnoses_summary(totals), style="yellow" if totals.diagnoses_disagree else "green"))


def diagnoses_summary(totals: Totals) -> str:
    bad = totals.diagnoses_disagree
    disagree = f"; they disagree on lines {bad}" if bad else ""
    return (
        f"the providers' own diagnoses ({totals.diagnoses} requests) agree with the explainer on the "
        f"part that changed (model, system, tools, messages) on {totals.diagnoses_agree} of "
        f"{totals.diagnoses_compared} compared{disagree}"
    )


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
    notes = []
    if any(c.approximate for c in costs):
        notes.append("~ token counts approximate (no offline tokenizer)")
    if any(c.spent_usd is None or c.lost_to_breaks_usd is None for c in costs):
        notes.append("n/a: no price in the table (--prices)")
    table.caption = "; ".join(notes) or None
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
        if span.provider is not None:  # found on that provider's reading of the body, in its tokens
            where = f"{span.piece} ({span.provider}{' ~' if span.approximate else ''})"
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


def print_cache_use(use: CacheUse, always: bool = False, console: Any = None) -> None:
    """What the cache models held, when it matters: evictions (``--cache-tokens``), sessions closed
    (``--session-window``), or always (``--profile``): the KV an engine needs for this log."""
    from rich.text import Text

    if not (always or use.evicted_blocks or use.sessions_closed):
        return
    console = console or _console()
    peak = use.peak_blocks * use.block_size
    held = f"the {use.scope} cache held at most {peak:,} tokens ({use.peak_blocks:,} blocks)"
    if use.capacity_blocks is not None:
        held += f" of the {use.capacity_blocks * use.block_size:,} --cache-tokens allows"
        held += f"; {use.evicted_blocks * use.block_size:,} tokens evicted"
    closed = ""
    if use.sessions_closed:
        closed = f"; {use.sessions_closed:,} sessions closed idle (--session-window)"
        if use.sessions_reopened:
            closed += f", {use.sessions_reopened:,} of them came back and were explained as new sessions"
    console.print(Text(held + closed, style="dim"))


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
