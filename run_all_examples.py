"""Run the KV-cache lessons in order, or the ones you name, on one shared engine.

    1  stable_prefix_vs_timestamp    a timestamp at the top of the system prompt vs a stable prefix
    2  append_only_vs_inplace_edit   JSON state edited in place vs an append-only, deterministic log
    3  manual_cache_boundary         an explicit cache breakpoint for engines without prefix caching
    4  session_consistency           session-sticky routing vs round robin across engine workers
    5  prefix_cache_isolation        a shared prefix cache tells one tenant what another sent; cache_salt
    6  tool_masking_vs_removal       tools removed from the prompt per state vs masked at decode time

The engine starts once and every lesson that can share it does (its prefix cache is reset
before each variant). A lesson that fails is reported and the others still run; the exit code
is non-zero if any failed.

Run:
    python run_all_examples.py              # all lessons
    python run_all_examples.py 1 3 --quick  # lessons 1 and 3, short prompts
    python run_all_examples.py --list
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.backend import Backend
from harness.cli import add_common_args, check_price_as, exit_with, open_backend
from harness.console import Table, console, err_console
from harness.engine import machine_summary
from harness.errors import UserError
from harness.report import ExampleResult, check_json_target, show, write_json


@dataclass(frozen=True)
class Lesson:
    number: int
    module: str
    title: str


LESSONS = [
    Lesson(1, "stable_prefix_vs_timestamp", "a timestamp at the top of the system prompt vs a stable prefix"),
    Lesson(2, "append_only_vs_inplace_edit", "JSON state edited in place vs an append-only log"),
    Lesson(3, "manual_cache_boundary", "an explicit cache breakpoint without automatic caching"),
    Lesson(4, "session_consistency", "session-sticky routing vs round robin across workers"),
    Lesson(5, "prefix_cache_isolation", "a shared prefix cache as a side channel; cache_salt per tenant"),
    Lesson(6, "tool_masking_vs_removal", "tools removed per state vs one tool list, masked at decode time"),
]
BY_NUMBER = {lesson.number: lesson for lesson in LESSONS}


def select(numbers: list[str]) -> list[Lesson]:
    """Parse the lesson numbers; any bad one fails here, before anything loads."""
    valid = ", ".join(str(n) for n in BY_NUMBER)
    if not numbers:
        return list(LESSONS)
    chosen: list[Lesson] = []
    for text in numbers:
        if not text.isdigit() or int(text) not in BY_NUMBER:
            raise UserError(f"unknown lesson '{text}': choose from {valid} (see --list)")
        lesson = BY_NUMBER[int(text)]
        if lesson in chosen:
            raise UserError(f"lesson {lesson.number} is selected twice: choose from {valid}, each once")
        chosen.append(lesson)
    return chosen


def load(lesson: Lesson) -> ModuleType:
    return importlib.import_module(lesson.module)


def lesson_args(module: ModuleType, shared: argparse.Namespace) -> argparse.Namespace:
    """The shared flags plus the lesson's own, at their defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    if hasattr(module, "add_lesson_args"):
        module.add_lesson_args(parser)
    args = parser.parse_args([])
    for key, value in vars(shared).items():
        setattr(args, key, value)
    return args


@dataclass
class Outcome:
    lesson: Lesson
    status: str  # ok | failed
    wall_s: float
    result: ExampleResult | None = None
    error: str = ""
    headline: str = ""  # the lesson's own figure, when it has one (lessons 3-6)


def own_engines(module: ModuleType) -> bool:
    """Lessons that start their own engines (lesson 4's workers) do not use the shared one."""
    return bool(getattr(module, "OWN_ENGINES", False))


def run_lesson(
    lesson: Lesson, module: ModuleType, backend: Backend | None, args: argparse.Namespace
) -> Outcome:
    console.rule(f"[bold]Lesson {lesson.number}: {lesson.module}[/]")
    start = time.perf_counter()
    try:
        result: ExampleResult = module.run(backend, lesson_args(module, args))
    except UserError as exc:
        return Outcome(lesson, "failed", time.perf_counter() - start, error=str(exc))
    except Exception as exc:  # one lesson's bug must not hide the others' results
        err_console.print(traceback.format_exc())
        return Outcome(lesson, "failed", time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    result.price_as = args.price_as
    show(result, extra_columns=getattr(module, "TABLE_COLUMNS", ()))
    if hasattr(module, "show_details"):
        module.show_details(result)
    headline = module.headline(result) if hasattr(module, "headline") else ""
    return Outcome(lesson, "ok", time.perf_counter() - start, result, headline=headline)


def summary_table(outcomes: list[Outcome]) -> Table:
    table = Table(title="All lessons", title_justify="left")
    columns = (
        "#",
        "lesson",
        "status",
        "hit WRONG",
        "hit RIGHT",
        "TTFT speedup",
        "prediction",
        "its own figure",
    )
    for name in (*columns, "wall s"):
        table.add_column(name, justify="left" if name in ("lesson", "status", "its own figure") else "right")
    for o in outcomes:
        row = [str(o.lesson.number), o.lesson.module]
        if o.result is not None:
            c = o.result.comparison()
            row += [
                "[green]ok[/]",
                f"{c['hit_rate_wrong']:.1%}",
                f"{c['hit_rate_right']:.1%}",
                f"{c['ttft_speedup_median']:.1f}x",
                "[green]exact[/]" if c["prediction_matches"] else "[red]mismatch[/]",
                o.headline,
            ]
        else:
            row += [f"[red]failed[/]: {o.error}", "", "", "", "", ""]
        row.append(f"{o.wall_s:.0f}")
        table.add_row(*row)
    return table


def check_report_dir(path: str | None) -> Path | None:
    """Fail early if ``--report DIR`` would mix with or overwrite files that are not a report."""
    if not path:
        return None
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--report {path} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "summary.json").is_file():
        raise UserError(f"--report {path} is a folder with other files in it; choose a new or empty one")
    return folder


def write_report(folder: Path, payload: dict[str, Any], outcomes: list[Outcome]) -> None:
    """summary.json, the plots, and a report.md that shows them."""
    from harness.plots import plot_example

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "summary.json", payload)
    lines = ["# KV-cache lessons: run report", ""]
    examples = payload["examples"]
    if examples:
        e = examples[0]["engine"]
        lines += [
            f"Engine: {e['backend']} {e['vllm_version']}, model {e['model']}, device {e['device']}, "
            f"block size {e['block_size']}. Wall time {payload['wall_s']:.0f} s.",
            "",
            f"Machine: {payload.get('machine', 'not recorded')}.",
            "",
        ]
    lines += [
        "| # | lesson | status | hit WRONG | hit RIGHT | TTFT speedup | prediction exact | its own figure "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        if o.result is not None:
            c = o.result.comparison()
            lines.append(
                f"| {o.lesson.number} | {o.lesson.module} | ok | {c['hit_rate_wrong']:.1%} | "
                f"{c['hit_rate_right']:.1%} | {c['ttft_speedup_median']:.1f}x | "
                f"{'yes' if c['prediction_matches'] else 'NO'} | {o.headline} | {o.wall_s:.0f} |"
            )
        else:
            lines.append(f"| {o.lesson.number} | {o.lesson.module} | {o.status} | | | | | | {o.wall_s:.0f} |")
    for example in examples:
        lines += ["", f"## {example['example']}", ""]
        for png in plot_example(example, folder):
            lines.append(f"![{png.stem}]({png.name})")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    console.print(f"[dim]wrote the report into {folder}/ (report.md, summary.json, plots)[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "lessons", nargs="*", metavar="N", help="lesson numbers to run, in that order (default: all)"
    )
    parser.add_argument("--list", action="store_true", help="list the lessons and exit")
    parser.add_argument(
        "--report", metavar="DIR", help="write summary.json, report.md and PNG plots of the run into DIR"
    )
    add_common_args(parser, json_schema="runner")
    args = parser.parse_args(argv)
    chosen = select(args.lessons)
    if args.list:
        for lesson in LESSONS:
            console.print(f"{lesson.number}  {lesson.module:<30} {lesson.title}")
        return 0
    args.price_as = check_price_as(args.price_as)
    json_path = check_json_target(args.json)
    report_dir = check_report_dir(args.report)
    start = time.perf_counter()
    modules = {lesson.number: load(lesson) for lesson in chosen}
    outcomes: list[Outcome] = []
    backend: Backend | None = None
    try:
        for position, lesson in enumerate(chosen):
            module = modules[lesson.number]
            if own_engines(module):
                later = [modules[x.number] for x in chosen[position + 1 :]]
                if backend is not None and not any(not own_engines(m) for m in later):
                    backend.close()  # nothing later needs it: give its memory to this lesson's engines
                    backend = None
                outcomes.append(run_lesson(lesson, module, backend, args))
                continue
            if backend is None:
                backend = open_backend(args)  # started once, shared by every lesson that can
            outcomes.append(run_lesson(lesson, module, backend, args))
    finally:
        if backend is not None:
            backend.close()
    wall_s = time.perf_counter() - start
    console.print(summary_table(outcomes))
    payload: dict[str, Any] = {
        "examples": [o.result.to_json() for o in outcomes if o.result is not None],
        "wall_s": round(wall_s, 3),
        "machine": machine_summary(),
        "status": {o.lesson.module: o.status for o in outcomes},
    }
    write_json(json_path, payload)
    if report_dir is not None:
        write_report(report_dir, payload, outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        err_console.print(f"[bold red]lesson {o.lesson.number} failed:[/] {o.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    exit_with(main)
