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

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

__all__ = ["Panel", "Table", "console", "err_console", "escape", "mark", "new_console"]

# Off a terminal (a file, a pipe, a CI log) rich would lay tables out for 80 columns and cut
# lesson 4's eleven columns to "prom…"; 120 keeps every header whole. COLUMNS still wins.
OFF_TERMINAL_WIDTH = 120


def new_console(off_terminal_width: int = OFF_TERMINAL_WIDTH, stderr: bool = False) -> Console:
    """A console as wide as the terminal, or ``off_terminal_width`` columns when the stream is not
    one (a log has no width: rows stay whole); ``COLUMNS`` wins over both."""
    stream = sys.stderr if stderr else sys.stdout
    wide = "COLUMNS" not in os.environ and not stream.isatty()
    return Console(stderr=stderr, highlight=False, width=off_terminal_width if wide else None)


console = new_console()
err_console = new_console(stderr=True)


def mark(ok: bool | None) -> str:
    """yes / NO / n/a, coloured, for the tables' agreement columns."""
    if ok is None:
        return "[dim]n/a[/]"
    return "[green]yes[/]" if ok else "[bold red]NO[/]"
