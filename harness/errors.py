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


SETUP_COMMAND = "python setup_and_test.py"


def missing_module_is_ours(exc: ModuleNotFoundError) -> bool:
    """The project's own module missing is a bug to show in full; anything else is the install."""
    return (exc.name or "").split(".")[0] == "harness"


def setup_first(exc: ModuleNotFoundError, in_project_venv: bool) -> str:
    """The one line for a package this Python lacks: the install was not made, or not finished.

    ``python setup_and_test.py`` installs the lessons' packages into ``.venv`` (and resumes an
    install that stopped); the scripts then restart in ``.venv`` by themselves."""
    what = f"No module named {exc.name!r}" if exc.name else first_line(exc)
    if in_project_venv:
        return f"the project's .venv is incomplete ({what}): run `{SETUP_COMMAND}` to finish the install"
    return (
        f"this Python lacks the lessons' packages ({what}): run `{SETUP_COMMAND}` first; it installs "
        "them into .venv, which the scripts then use by themselves"
    )
