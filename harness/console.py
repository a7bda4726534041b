"""The two consoles every script prints to (results on stdout, errors and progress on stderr),
and the rich pieces the lessons draw with.

Scripts take ``Table``, ``Panel`` and ``escape`` from here rather than from rich, so that their
first import is the harness: from a Python without the project's packages, importing the harness
restarts the script in the project's ``.venv`` (see ``harness/__init__.py``) before anything else
is needed.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

__all__ = ["Panel", "Table", "console", "err_console", "escape", "mark"]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def mark(ok: bool | None) -> str:
    """yes / NO / n/a, coloured, for the tables' agreement columns."""
    if ok is None:
        return "[dim]n/a[/]"
    return "[green]yes[/]" if ok else "[bold red]NO[/]"
