"""The two consoles every script prints to: results on stdout, errors and progress on stderr."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def mark(ok: bool | None) -> str:
    """yes / NO / n/a, coloured, for the tables' agreement columns."""
    if ok is None:
        return "[dim]n/a[/]"
    return "[green]yes[/]" if ok else "[bold red]NO[/]"
