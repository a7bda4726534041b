"""The two consoles every script prints to (results on stdout, errors and progress on stderr),
and the rich pieces the lessons draw with.

Scripts take ``Table``, ``Panel`` and ``escape`` from here rather than from rich, so that their
first import is the harness: from a Python without the project's packages, importing the harness
restarts the script in the project's ``.venv`` (see ``harness/__init__.py``) before anything else
is needed.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

__all__ = ["Panel", "Table", "console", "err_console", "escape", "mark"]

# Off a terminal (a file, a pipe, a CI log) rich would lay tables out for 80 columns and cut
# lesson 4's eleven columns to "prom…"; 120 keeps every header whole. COLUMNS still wins.
OFF_TERMINAL_WIDTH = 120


def _width(stream: TextIO) -> int | None:
    if "COLUMNS" in os.environ or stream.isatty():
        return None  # rich's own choice: the terminal's width, or COLUMNS
    return OFF_TERMINAL_WIDTH


console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))


def mark(ok: bool | None) -> str:
    """yes / NO / n/a, coloured, for the tables' agreement columns."""
    if ok is None:
        return "[dim]n/a[/]"
    return "[green]yes[/]" if ok else "[bold red]NO[/]"
