"""The one error type a user should ever see: a clear, one-line message and an exit code."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing prerequisite. Printed as one line, never as a traceback."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException | str, fallback: str | None = None) -> str:
    """The first non-empty line of an error (libraries raise pages of text; a user needs one line)."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    if fallback is not None:
        return fallback
    return type(error).__name__ if isinstance(error, BaseException) else ""
