"""Where the explainer's time goes (``--profile``): wall seconds per stage, summed over the log.

Stages, in the order a request meets them:

``start-up``        importing vLLM's renderer and loading the tokenizer and chat template (once)
``read and parse``  reading the log's lines and parsing their JSON (both passes: the check of
                    every line before anything slow, and the analysis)
``render``          vLLM's own request validation, message parsing and chat template
``tokenize``        turning the rendered text into token IDs (only pieces not seen lately)
``cache model``     hashing the blocks, looking them up and recording them in every cache
``messages``        finding the message that holds a divergence, the reply's tokens
``hints and spans`` what changed on a break, and where the prompts agree again
``replay``          ``--verify`` / ``--endpoint``: the engine or server run
``providers``       ``--provider``: each provider's simulation and prices
``output``          rows, tables and JSON written

The stages do not overlap: their sum is the run's wall time, less what no stage claims (shown
as ``other``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

STAGES = (
    "start-up",
    "read and parse",
    "render",
    "tokenize",
    "cache model",
    "messages",
    "hints and spans",
    "replay",
    "providers",
    "output",
)


@dataclass
class Profile:
    """Seconds per stage. ``stage(name)`` times a block; a disabled profile times nothing."""

    enabled: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def move(self, name: str, into: str, seconds: float) -> None:
        """Count ``seconds`` that ``name`` timed as ``into`` instead (a stage inside another)."""
        if self.enabled and seconds:
            self.seconds[name] = self.seconds.get(name, 0.0) - seconds
            self.add(into, seconds)

    def rows(self) -> list[tuple[str, float]]:
        wall = time.perf_counter() - self.started
        rows = [(name, self.seconds[name]) for name in STAGES if name in self.seconds]
        rows.append(("other", max(0.0, wall - sum(self.seconds.values()))))
        rows.append(("total (wall)", wall))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {name: round(seconds, 3) for name, seconds in self.rows()}


DISABLED = Profile(enabled=False)


def print_profile(profile: Profile, tokens: int, console: Any) -> None:
    from rich.table import Table

    table = Table(title="where the time went (--profile)", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    rows = profile.rows()
    wall = rows[-1][1] or 1.0
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.2f}", f"{seconds / wall:.0%}")
    console.print(table)
    analysis = wall - profile.seconds.get("start-up", 0.0)
    if tokens and analysis > 0:
        rate = tokens / analysis
        console.print(f"{tokens:,} prompt tokens in {analysis:.1f} s after start-up: {rate:,.0f} tokens/s")
