"""The command line of ``python -m harness.monitor``: the flags, the checks, the polling loop.

Bad input (a flag, a URL, an output that cannot be written or would overwrite a file that is not
the monitor's, a URL that is not a vLLM server) is an error before anything starts. Ctrl-C ends
it cleanly: at the next interval boundary, with the files written.

For scripts: ``--once --json PATH`` writes one snapshot (the counters since each server started)
and exits; with ``--duration S`` it watches S seconds and writes the window's deltas instead.
``--record FILE.csv`` appends one row per server per interval; ``--plot FILE.png`` draws hit rate
and TTFT over time at exit; ``--save-dashboard FILE.svg|.txt|.html`` keeps the last dashboard.
See docs/monitor.md.

Exit status: 0; 1 when ``--once`` finds a server down (the JSON still says which); 2 for bad
input, reported as one line ``error: ...`` before any polling starts.
"""

from __future__ import annotations

import argparse
import csv
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.text import Text

from harness import outputs
from harness.api_key import add_api_key_arg, api_key_from
from harness.console import new_console
from harness.errors import UserError
from harness.monitor.dashboard import DASHBOARD_TITLE, dashboard, fmt_pct, plain_line, save_dashboard
from harness.monitor.kv_events import KvEventCounter
from harness.monitor.outputs import CSV_COLUMNS, JSON_KIND, CsvRecorder, Timeline, draw_plot, snapshot_json
from harness.monitor.poll import (
    ServerTrack,
    ServerView,
    Target,
    check_details,
    normalize_url,
    read_all,
    total_view,
)

DEFAULT_INTERVAL_S = 2.0
DEFAULT_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m harness.monitor",
        description="Live prefix-cache hit rate, TTFT and load of running vLLM servers, from /metrics.",
    )
    parser.add_argument("urls", nargs="*", metavar="URL", help="vLLM server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--endpoints", metavar="URL1,URL2", help="more servers, comma-separated")
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        help=f"seconds between readings (default {DEFAULT_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for a /metrics page before showing the server as down "
        f"(default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="no live dashboard: one snapshot (counters since each server started) or, with "
        "--duration, the deltas over that window; printed, and written with --json",
    )
    parser.add_argument("--json", metavar="PATH", help="write the final snapshot as JSON")
    parser.add_argument("--record", metavar="FILE.csv", help="append one row per server per interval")
    parser.add_argument("--plot", metavar="FILE.png", help="at exit, draw hit rate and TTFT over time")
    parser.add_argument(
        "--save-dashboard",
        action="append",
        default=[],
        metavar="FILE",
        help="at exit, save the last dashboard (.svg, .html or .txt; may be repeated)",
    )
    parser.add_argument(
        "--history", type=int, default=30, help="intervals in the hit-rate sparkline (default 30)"
    )
    parser.add_argument(
        "--check-details",
        action="store_true",
        help="send one 1-token request per server at start to see whether it reports per-request "
        "cached tokens (--enable-prompt-tokens-details); /metrics does not say",
    )
    parser.add_argument(
        "--kv-events",
        action="append",
        default=[],
        metavar="[URL=]tcp://HOST:PORT",
        help="subscribe to a server's KV-cache events (started with --kv-events-config) and count "
        "blocks stored and evicted per interval; URL= names the server when there are several",
    )
    add_api_key_arg(
        parser,
        "the servers, for a proxy that guards /metrics and for --check-details (vLLM leaves /metrics "
        "open)",
    )
    return parser


def targets_from_args(args: argparse.Namespace) -> list[Target]:
    raw = list(args.urls)
    if args.endpoints:
        raw += [u for u in args.endpoints.split(",") if u.strip()]
    if not raw:
        raise UserError("no server given: python -m harness.monitor URL [URL ...] (or --endpoints URL1,URL2)")
    urls = [normalize_url(u) for u in raw]
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise UserError(f"{url} is given twice")
        seen.add(url)
    events: dict[str, str] = {}
    for spec in args.kv_events:
        server, sep, endpoint = spec.partition("=")
        if not sep:
            if len(urls) != 1:
                raise UserError(f"--kv-events {spec}: with several servers say which: URL=tcp://HOST:PORT")
            server, endpoint = urls[0], spec
        server = normalize_url(server)
        if server not in seen:
            raise UserError(f"--kv-events {spec}: {server} is not one of the servers watched")
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise UserError(f"--kv-events {spec}: the endpoint must be tcp://HOST:PORT or ipc://PATH")
        if server in events:
            raise UserError(f"--kv-events: two endpoints for {server}")
        events[server] = endpoint.replace("tcp://*:", "tcp://127.0.0.1:")
    key = api_key_from(args.api_key)
    return [Target(url, events.get(url), key) for url in urls]


@dataclass(frozen=True)
class Outputs:
    json: Path | None
    record: Path | None
    plot: Path | None
    dashboards: tuple[Path, ...]


def check_outputs(args: argparse.Namespace) -> Outputs:
    """Fail before polling if an output cannot be written or would overwrite something not ours."""
    json_path = record = plot = None
    if args.json:
        json_path = outputs.check_json_target(
            "--json",
            args.json,
            lambda doc: isinstance(doc, dict) and doc.get("kind") == JSON_KIND,
            "a monitor snapshot",
        )
    if args.record:
        record = outputs.writable_target("--record", args.record)
        if record.exists() and record.stat().st_size:
            with record.open(newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != CSV_COLUMNS:
                raise UserError(
                    f"--record {args.record} exists with other columns; appending would mix tables: "
                    "choose another name"
                )
    if args.plot:
        if not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot {args.plot}: the plot is a PNG, name it FILE.png")
        plot = outputs.writable_target("--plot", args.plot)
        if plot.exists() and plot.stat().st_size and plot.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            raise UserError(f"--plot {args.plot} exists and is not a PNG; remove it or choose another name")
    dashboards: list[Path] = []
    for name in args.save_dashboard:
        if Path(name).suffix.lower() not in (".svg", ".html", ".txt"):
            raise UserError(f"--save-dashboard {name}: name it FILE.svg, FILE.html or FILE.txt")
        dashboard = outputs.writable_target("--save-dashboard", name)
        if dashboard.exists() and dashboard.stat().st_size:
            head = dashboard.read_text(errors="replace")[:4000]
            if "Generated with Rich" not in head and DASHBOARD_TITLE not in head:
                raise UserError(
                    f"--save-dashboard {name} exists and is not a saved dashboard; "
                    "remove it or choose another name"
                )
        dashboards.append(dashboard)
    return Outputs(json_path, record, plot, tuple(dashboards))


def check_numbers(args: argparse.Namespace) -> None:
    if not (args.interval > 0 and math.isfinite(args.interval)):
        raise UserError(f"--interval must be a positive number of seconds, got {args.interval:g}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.duration is not None and not (args.duration > 0 and math.isfinite(args.duration)):
        raise UserError(f"--duration must be a positive number of seconds, got {args.duration:g}")
    if args.history < 1:
        raise UserError(f"--history must be at least 1, got {args.history}")


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """Everything one monitor run owns, so the exit path can close it whatever happened."""

    targets: list[Target]
    args: argparse.Namespace
    outputs: Outputs
    console: Console
    tracks: list[ServerTrack]
    pool: ThreadPoolExecutor
    recorder: CsvRecorder | None = None
    timeline: Timeline = field(default_factory=Timeline)
    total_history: deque[float | None] = field(default_factory=deque)
    last_renderable: Any = None
    watched_s: float = 0.0  # seconds from the baseline reading to the last one

    def close(self) -> None:
        for track in self.tracks:
            if track.events is not None:
                track.events.close()
        if self.recorder is not None:
            self.recorder.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def start(args: argparse.Namespace, console: Console) -> Run:
    """Everything that can fail on bad input, before the first interval."""
    check_numbers(args)
    targets = targets_from_args(args)
    outputs = check_outputs(args)
    started = time.time()
    pool = ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="metrics")
    tracks = [ServerTrack(t, started, args.history) for t in targets]
    run = Run(targets, args, outputs, console, tracks, pool, total_history=deque(maxlen=args.history))
    try:
        first = read_all(targets, args.timeout, pool)
        foreign = [r for r in first if r.not_vllm]
        if foreign:
            r = foreign[0]
            raise UserError(f"{r.target.url} is not a vLLM server: {r.error}")
        for r in first:
            if r.refused is not None:
                raise r.target.api_key.refused(r.target.url, r.refused)
        if args.check_details:
            for track, reading in zip(tracks, first, strict=True):
                if reading.scrape is not None:
                    try:
                        track.details_note = check_details(track.target, args.timeout)
                    except UserError:  # a refused key: the same for every request to come
                        raise
                    except Exception as exc:  # a probe that fails is a note, not a crash
                        track.details_note = f"--check-details failed: {exc}"
        for track in tracks:
            if track.target.kv_events:
                track.events = KvEventCounter(track.target.kv_events)
        if outputs.record is not None:
            run.recorder = CsvRecorder(outputs.record)
    except BaseException:
        run.close()
        raise
    return run


def watch(run: Run, stop: threading.Event) -> None:
    """Poll until --duration is over or ``stop`` is set (Ctrl-C); show each interval.

    Ctrl-C sets ``stop`` rather than raising in the middle of an update, so the interval being
    counted is either wholly in the final figures or not at all."""
    args, console = run.args, run.console
    live_display = console.is_terminal and not args.once
    started = time.monotonic()
    # The baseline, read after --check-details so its probe request falls outside every window.
    readings = read_all(run.targets, args.timeout, run.pool)
    for track, reading in zip(run.tracks, readings, strict=True):
        track.observe(reading)  # the baseline: no interval yet
    live: Any = None
    if live_display:
        from rich.live import Live

        live = Live(console=console, auto_refresh=False, transient=False)
        live.start()
        live.update(Text(f"{DASHBOARD_TITLE}: first reading done, next in {args.interval:g} s"), refresh=True)
    elif not args.once:
        console.print(f"{DASHBOARD_TITLE}: watching {len(run.targets)} server(s) every {args.interval:g} s")
    tick = 0
    try:
        while not stop.is_set():
            tick += 1
            next_at = started + tick * args.interval
            if args.duration is not None:
                next_at = min(next_at, started + args.duration)
            delay = next_at - time.monotonic()
            if delay < 0:
                # Readings slower than the interval: skip the missed ticks, measure real time.
                tick = int((time.monotonic() - started) // args.interval)
            elif stop.wait(delay):
                break
            readings = read_all(run.targets, args.timeout, run.pool)
            elapsed = time.monotonic() - started
            views = [track.observe(r) for track, r in zip(run.tracks, readings, strict=True)]
            total = total_view(views, run.total_history)
            run.timeline.add([*views, total] if len(views) > 1 else views, elapsed)
            if run.recorder is not None:
                run.recorder.write(views, elapsed)
            run.watched_s = elapsed
            what = (
                f"last {args.interval:g} s interval; hit (all) since the monitor started {elapsed:.0f} s ago"
            )
            renderable = dashboard(views, total, what)
            run.last_renderable = renderable
            if live is not None:
                live.update(renderable, refresh=True)
            elif not args.once:
                console.print(plain_line(views, total, elapsed), soft_wrap=True)
            if args.duration is not None and elapsed >= args.duration - 1e-6:
                break
    finally:
        if live is not None:
            live.stop()


@dataclass(frozen=True)
class Final:
    views: list[ServerView]
    total: ServerView
    window: str  # what the JSON's windows cover


def finish(run: Run, final: Final) -> int:
    """The final snapshot on screen and into the files. A saved dashboard is the last live frame
    (with its sparkline), or the final snapshot with --once."""
    args, console = run.args, run.console
    what = final.window if args.once and args.duration is None else f"{final.window} ({run.watched_s:.0f} s)"
    final_table = dashboard(final.views, final.total, what)
    if args.once or run.last_renderable is None:
        run.last_renderable = final_table
    if args.once or not console.is_terminal:
        console.print(final_table)
    else:  # the live frame stays on screen; add the figures since the start
        summary = ", ".join(
            f"{v.name} {fmt_pct(v.overall.hit_rate if v.overall else None)}" for v in final.views
        )
        console.print(f"since the monitor started: hit rate {summary}")
    if run.outputs.json is not None:
        outputs.write_json(
            run.outputs.json, snapshot_json(final.views, final.total, final.window, args.interval)
        )
        console.print(f"wrote {run.outputs.json}")
    if run.outputs.record is not None:
        console.print(f"appended to {run.outputs.record}")
    if run.outputs.plot is not None:
        if run.timeline.points:
            names = ", ".join(t.name for t in run.targets)
            draw_plot(run.timeline, run.outputs.plot, f"vLLM prefix cache: {names}", args.interval)
            console.print(f"wrote {run.outputs.plot}")
        else:
            console.print(f"no interval completed: {run.outputs.plot} not drawn")
    for path in run.outputs.dashboards:
        if run.last_renderable is not None:
            save_dashboard(run.last_renderable, path)
            console.print(f"wrote {path}")
    return 1 if args.once and not all(v.up for v in final.views) else 0


def final_of_watch(run: Run) -> Final:
    """The snapshot after watching: every server's figures since the monitor started."""
    views = [
        replace(t.last_view, window=t.overall, overall=t.overall, events=t.events_total)
        for t in run.tracks
        if t.last_view is not None
    ]
    total = total_view(views, deque(maxlen=1))
    return Final(views, replace(total, history=tuple(run.total_history)), "since the monitor started")


def run_monitor(argv: Sequence[str] | None, console: Console) -> int:
    args = build_parser().parse_args(argv)
    run = start(args, console)
    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        if args.once and args.duration is None:
            readings = read_all(run.targets, args.timeout, run.pool)
            views = [track.snapshot(r) for track, r in zip(run.tracks, readings, strict=True)]
            total = total_view(views, run.total_history)
            if run.recorder is not None:
                run.recorder.write(views, 0.0)
            return finish(run, Final(views, total, "since each server started"))
        watch(run, stop)
        return finish(run, final_of_watch(run))
    finally:
        restore()
        run.close()


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Ctrl-C (or ``kill PID``) ends the monitor at the next interval boundary, with the files
    written; a second Ctrl-C interrupts at once."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    try:
        previous = [(sig, signal.signal(sig, handler)) for sig in (signal.SIGINT, signal.SIGTERM)]
    except ValueError:  # not the main thread (a test calling main): leave signals alone
        return lambda: None

    def restore() -> None:
        for sig, old in previous:
            signal.signal(sig, old)

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. User errors print one line (``error: ...``) and return their exit code."""
    # Off a terminal the table needs about 170 columns to show every figure unclipped.
    console = new_console(off_terminal_width=200)
    from harness.cli import run_cli

    return run_cli(lambda args: run_monitor(args, console), list(argv) if argv is not None else None)
