"""run_all_examples.py as a user runs it: selection, the shared engine, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script, validate

import run_all_examples as runner
from harness.engine import cpu_threads
from harness.errors import UserError


def test_selection_keeps_the_order_given() -> None:
    assert [lesson.number for lesson in runner.select(["3", "1"])] == [3, 1]
    assert [lesson.number for lesson in runner.select([])] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("bad", ["9", "0", "x", "-1", "1.5"])
def test_selection_rejects_bad_numbers(bad: str) -> None:
    with pytest.raises(UserError, match=f"unknown lesson '{bad}': choose from 1, 2, 3, 4, 5, 6"):
        runner.select([bad])


def test_report_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    proc = run_script("run_all_examples.py", "1", "--quick", "--report", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: --report {tmp_path} is a folder with other files")
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.engine
def test_run_lesson_1_with_report(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    report = tmp_path / "report"
    proc = run_script("run_all_examples.py", "1", "--quick", "--json", str(out), "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    validate("runner", data)
    assert [e["example"] for e in data["examples"]] == ["stable_prefix_vs_timestamp"]
    assert data["wall_s"] > 0
    assert json.loads((report / "summary.json").read_text())["examples"] == data["examples"]
    for png in ("stable_prefix_vs_timestamp_ttft.png", "stable_prefix_vs_timestamp_tokens.png"):
        assert (report / png).stat().st_size > 5000
        assert f"]({png})" in (report / "report.md").read_text()
    assert f"{cpu_threads()} usable cores" in data["machine"]
    assert f"Machine: {data['machine']}." in (report / "report.md").read_text()


def test_scripts_restart_in_the_project_venv_from_a_bare_python(tmp_path: Path) -> None:
    """A reader's own Python without vLLM (here: a new, empty virtual environment) runs the
    runner and the explainer: they restart themselves in .venv, and that Python gains nothing."""
    import os
    import subprocess
    import sys
    import venv

    root = Path(__file__).resolve().parents[1]
    if not (root / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv here: this checkout was set up with --in-place")
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    env = {k: v for k, v in os.environ.items() if k != "KVCACHE_LESSONS_NO_VENV"}
    for args in (["run_all_examples.py", "--list"], ["-m", "harness.explain", "--help"]):
        proc = subprocess.run(
            [str(bare / "bin" / "python"), *args],
            cwd=root,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "prefix_cache_isolation"
        in subprocess.run(
            [str(bare / "bin" / "python"), "run_all_examples.py", "--list"],
            cwd=root,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        ).stdout
    )
    assert not list((bare / "lib").glob("python*/site-packages/rich"))
    assert sys.prefix != str(bare)
