"""First contact: every command a reader types, started before ``python setup_and_test.py``, says
in one line to run the setup first (exit 2), instead of ``ModuleNotFoundError: No module named
'rich'``.

A Python without the project's packages is this very interpreter started with ``-S`` (no
site-packages at all: only the standard library), with ``KVCACHE_LESSONS_NO_VENV=1`` so that it
does not restart in ``.venv`` as it would on a machine where the setup has run. A partial
install is the same plus a folder holding ``rich`` alone on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from harness.cli import run_cli

ENTRY_POINTS = [
    ("stable_prefix_vs_timestamp.py",),
    ("append_only_vs_inplace_edit.py",),
    ("manual_cache_boundary.py",),
    ("session_consistency.py",),
    ("prefix_cache_isolation.py",),
    ("run_all_examples.py",),
    ("-m", "harness.explain"),
    ("-m", "harness.monitor"),
]
RUN_SETUP = "run `python setup_and_test.py` first; it installs them into .venv"


def bare_python(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["KVCACHE_LESSONS_NO_VENV"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )


def assert_setup_first(proc: subprocess.CompletedProcess[str], module: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: this Python lacks the lessons' packages (No module named '{module}'): {RUN_SETUP}, "
        "which the scripts then use by themselves"
    ], proc.stderr


@pytest.mark.parametrize("command", ENTRY_POINTS)
@pytest.mark.parametrize("help_flag", [(), ("--help",)])
def test_before_setup_every_command_says_to_run_it(
    command: tuple[str, ...], help_flag: tuple[str, ...]
) -> None:
    assert_setup_first(bare_python(*command, *help_flag), "rich")


@pytest.fixture(scope="module")
def rich_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``rich`` and nothing else of the project's packages."""
    import rich

    folder = tmp_path_factory.mktemp("rich-only")
    (folder / "rich").symlink_to(Path(rich.__file__).parent)
    return folder


@pytest.mark.parametrize(
    ("command", "missing"),
    [(("manual_cache_boundary.py", "--help"), "torch"), (("session_consistency.py", "--help"), "httpx")],
)
def test_a_partial_install_is_the_same_line(rich_only: Path, command: tuple[str, ...], missing: str) -> None:
    """What a script imports at its start, missing: the line names the package."""
    assert_setup_first(bare_python(*command, pythonpath=rich_only), missing)


def test_the_monitor_needs_no_more_than_rich(rich_only: Path) -> None:
    """docs/monitor.md: it imports no vLLM; the check must not ask for more."""
    proc = bare_python("-m", "harness.monitor", "--help", pythonpath=rich_only)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m harness.monitor" in proc.stdout


@pytest.mark.parametrize(
    ("in_venv", "expected"),
    [
        (False, f"this Python lacks the lessons' packages (No module named 'matplotlib'): {RUN_SETUP}"),
        (True, "the project's .venv is incomplete (No module named 'matplotlib'): run `python "
         "setup_and_test.py` to finish the install"),
    ],
)  # fmt: skip
def test_a_package_missing_inside_a_command_is_one_line(
    in_venv: bool, expected: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imported on the way (matplotlib for a plot): the same line, through run_cli."""
    monkeypatch.setattr("harness.cli.in_project_venv", lambda: in_venv)

    def main(argv: list[str] | None) -> int:
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    assert run_cli(main, []) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {expected}"), line


def test_the_projects_own_module_missing_is_a_bug_not_the_install() -> None:
    def main(argv: list[str] | None) -> int:
        raise ModuleNotFoundError("No module named 'harness.nope'", name="harness.nope")

    with pytest.raises(ModuleNotFoundError):
        run_cli(main, [])
