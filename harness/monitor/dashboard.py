"""What the monitor shows: a table with a row per server and the total, or a line for logs.

Per server and in total, what the cache did in the last interval (the hit rate also since the
monitor started):

* **hit rate**: of the prompt tokens the engine looked up in its prefix cache, the share it
  found there, ``Δ vllm:prefix_cache_hits_total / Δ vllm:prefix_cache_queries_total``. It is
  token-weighted (a long prompt counts more than a short one, as its prefill costs more) and
  the total sums the servers' deltas before dividing: never an average of ratios, which would
  let an idle server or a tiny request pull the figure anywhere;
* requests per second (finished requests), prompt tokens per second and how many of them came
  from the cache (``vllm:prompt_tokens_total``, ``vllm:prompt_tokens_cached_total``);
* **TTFT p50 / p90** over the interval, from the increase of each bucket of the
  ``vllm:time_to_first_token_seconds`` histogram. vLLM exports buckets, not single times, so a
  quantile is only known to lie in one bucket: the table shows the bucket ``(lower, upper]``
  and an estimate interpolated inside it (as Prometheus's ``histogram_quantile`` does);
* running and waiting requests, KV-cache usage (gauges, as read), preemptions (per interval);
* with ``--kv-events``, the KV blocks stored and evicted (``kv_events``);
* the recent history of the hit rate as a sparkline.

``save_dashboard`` keeps a frame as SVG, HTML or text (``--save-dashboard``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from harness.metrics import BucketQuantile, Window
from harness.monitor.kv_events import BlockCounts
from harness.monitor.poll import ServerView

SPARK = "▁▂▃▄▅▆▇█"
DASHBOARD_TITLE = "vLLM prefix-cache monitor"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_rate(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def fmt_bound(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def fmt_quantile(bq: BucketQuantile | None) -> str:
    if bq is None:
        return "-"
    if math.isinf(bq.upper):
        return f">{fmt_bound(bq.lower)} s"
    return f"{bq.estimate:.2f} ({fmt_bound(bq.lower)},{fmt_bound(bq.upper)}]"


def fmt_blocks(b: BlockCounts) -> str:
    return f"+{b.stored} -{b.evicted} ({b.restored})"


def sparkline(history: Sequence[float | None]) -> str:
    return "".join("·" if h is None else SPARK[min(len(SPARK) - 1, int(h * len(SPARK)))] for h in history)


def hit_cell(view: ServerView, window: Window | None) -> str:
    if view.prefix_caching is False:
        return "off"
    return fmt_pct(window.hit_rate if window else None)


def row_cells(view: ServerView) -> list[str]:
    w = view.window
    counters = w.counters if w else None
    prompt_rate = w.rate("prompt_tokens") if w else None
    cached_rate = w.rate("cached_prompt_tokens") if w else None
    cells = [
        view.name,
        view.state,
        hit_cell(view, w),
        hit_cell(view, view.overall),
        fmt_rate(w.rate("requests") if w else None, 2),
        fmt_rate(prompt_rate, 0),
        fmt_rate(cached_rate, 0),
        fmt_quantile(w.quantile(0.5) if w else None),
        fmt_quantile(w.quantile(0.9) if w else None),
        fmt_rate(view.running, 0),
        fmt_rate(view.waiting, 0),
        fmt_pct(view.kv_usage),
        fmt_rate(counters.preemptions if counters else None, 0),
    ]
    if view.events is not None:
        cells.append(fmt_blocks(view.events))
    cells.append(sparkline(view.history))
    return cells


def dashboard(views: Sequence[ServerView], total: ServerView, what: str) -> Group:
    """The table (a row per server, the total) and the notes under it; ``what`` says which
    window the figures cover."""
    table = Table(
        title=f"{DASHBOARD_TITLE}, {datetime.now().strftime('%H:%M:%S')}: {what}",
        title_justify="left",
        caption=(
            "hit = Δprefix_cache_hits / Δprefix_cache_queries (tokens), summed before dividing; "
            "TTFT quantiles are bucket-resolution: estimate (bucket lower, upper] s"
        ),
        caption_justify="left",
    )
    columns = [
        ("server", "left"),
        ("state", "left"),
        ("hit", "right"),
        ("hit (all)", "right"),
        ("req/s", "right"),
        ("prompt/s", "right"),
        ("cached/s", "right"),
        ("TTFT p50 s", "right"),
        ("TTFT p90 s", "right"),
        ("run", "right"),
        ("wait", "right"),
        ("KV use", "right"),
        ("preempt", "right"),
    ]
    if any(v.events is not None for v in views):
        columns.append(("blocks +new -evicted (re-stored)", "right"))
    columns.append(("hit history", "left"))
    for header, justify in columns:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for view in views:
        style = None if view.up else "red"
        table.add_row(*(escape(c) for c in row_cells(view)), style=style)
    if len(views) > 1:
        table.add_section()
        table.add_row(*(escape(c) for c in row_cells(total)), style="bold")
    notes = [n for v in views for n in v.notes]
    parts: list[Any] = [table]
    if notes:
        parts.append(Text("\n".join(notes), style="yellow"))
    return Group(*parts)


def plain_line(views: Sequence[ServerView], total: ServerView, elapsed: float) -> str:
    """One line per interval for logs (no terminal): the total in full, each server in brief."""

    def brief(v: ServerView) -> str:
        if not v.up:
            return f"{v.name} {v.state.upper()}"
        w = v.window
        rate = w.rate("requests") if w else None
        return (
            f"{v.name} {v.state} hit {hit_cell(v, w)} req/s {fmt_rate(rate, 2)} "
            f"p50 {fmt_quantile(w.quantile(0.5) if w else None)}"
        )

    w = total.window
    since_start = total.overall.hit_rate if total.overall else None
    head = (
        f"{datetime.now().strftime('%H:%M:%S')} +{elapsed:.0f}s total {total.state}: "
        f"hit {fmt_pct(w.hit_rate if w else None)} (since start {fmt_pct(since_start)})"
    )
    if w is not None:
        head += (
            f", req/s {fmt_rate(w.rate('requests'), 2)}"
            f", prompt tok/s {fmt_rate(w.rate('prompt_tokens'), 0)}"
            f" (cached {fmt_rate(w.rate('cached_prompt_tokens'), 0)})"
            f", TTFT p50 {fmt_quantile(w.quantile(0.5))} p90 {fmt_quantile(w.quantile(0.9))}"
        )
    if total.events is not None:
        head += f", KV blocks {fmt_blocks(total.events)}"
    return " | ".join([head, *(brief(v) for v in views)])


def save_dashboard(renderable: Any, path: Path) -> None:
    # Wide enough for every column; a table takes only the width it needs.
    recorder = Console(record=True, width=240, file=io.StringIO(), force_terminal=True, highlight=False)
    recorder.print(renderable)
    suffix = path.suffix.lower()
    if suffix == ".svg":
        recorder.save_svg(str(path), title=DASHBOARD_TITLE)
    elif suffix == ".html":
        recorder.save_html(str(path))
    else:
        recorder.save_text(str(path))
