"""What a lesson shows while it runs: each request as it completes, and the running totals.

On a terminal a small live table (the latest requests: prompt, cached by the engine, the
prediction, TTFT) and a footer (the variant's hit rate so far, token-weighted, and its median TTFT)
redraw in place and vanish when the variant ends, so the final tables stay exactly as they were.
Anywhere else (a pipe, a CI log) each request is one plain line: no control codes.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # measure.run_variants shows its requests here: no import back at run time
    from harness.measure import RequestRecord

ROWS = 8  # the latest requests kept on screen


class LiveVariant:
    """One variant's requests as they complete (see the module docstring)."""

    def __init__(self, console: Console, name: str, total: int, live: Live | None) -> None:
        self.console = console
        self.name = name
        self.total = total
        self.records: list[RequestRecord] = []
        self.labels: dict[str, list[RequestRecord]] = {}
        self._live = live

    def hit_rate(self) -> float:
        prompt = sum(r.prompt_tokens for r in self.records)
        return sum(r.cached_tokens for r in self.records) / prompt if prompt else 0.0

    def median_ttft_ms(self) -> float:
        return statistics.median(r.ttft_ms for r in self.records) if self.records else 0.0

    def footer(self) -> str:
        return (
            f"{self.name.upper()} {len(self.records)}/{self.total}: hit rate so far {self.hit_rate():.1%}, "
            f"median TTFT {self.median_ttft_ms():,.0f} ms"
        )

    def by_label(self) -> str:
        """Per label (worker), its requests and hit rate so far, token-weighted."""
        parts = []
        for label in sorted(self.labels):
            records = self.labels[label]
            prompt = sum(r.prompt_tokens for r in records)
            cached = sum(r.cached_tokens for r in records)
            parts.append(f"{label}: {len(records)} req, hit {cached / prompt if prompt else 0.0:.1%}")
        return "; ".join(parts)

    def add(self, record: RequestRecord, label: str | None = None) -> None:
        """One completed request (``label``: e.g. the worker it went to; each label's hit rate
        is shown too)."""
        self.records.append(record)
        if label is not None:
            self.labels.setdefault(label, []).append(record)
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            return
        match = "=" if record.prediction_ok else "!="
        where = f" {label}" if label else ""
        self.console.print(
            f"  {self.name} #{record.index}{where}: prompt {record.prompt_tokens:,}, "
            f"cached {record.cached_tokens:,} {match} predicted {record.predicted_cached_tokens:,}, "
            f"TTFT {record.ttft_ms:,.0f} ms | {self.footer()}",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line per request in a log, however long
        )

    def render(self) -> Any:
        table = Table(title=f"{self.name.upper()} (live)", title_justify="left", box=None)
        for name in ("#", "prompt", "cached", "predicted", "match", "TTFT ms"):
            table.add_column(name, justify="right")
        for r in self.records[-ROWS:]:
            ok = "[green]yes[/]" if r.prediction_ok else "[bold red]NO[/]"
            table.add_row(
                str(r.index),
                f"{r.prompt_tokens:,}",
                f"{r.cached_tokens:,}",
                f"{r.predicted_cached_tokens:,}",
                ok,
                f"{r.ttft_ms:,.0f}",
            )
        lines = [table, Text(self.footer(), style="bold")]
        if self.labels:
            lines.append(Text(self.by_label()))
        return Group(*lines)


@contextmanager
def live_variant(console: Console, name: str, total: int) -> Iterator[LiveVariant]:
    """Show ``name``'s requests live while the block runs; nothing stays behind on a terminal."""
    if not console.is_terminal:
        yield LiveVariant(console, name, total, None)
        return
    placeholder = Text(f"{name.upper()} 0/{total}: waiting for the first request ...")
    with Live(placeholder, console=console, transient=True, refresh_per_second=4) as live:
        yield LiveVariant(console, name, total, live)
