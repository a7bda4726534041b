"""Watch the prefix cache of running vLLM servers: ``python -m harness.monitor URL [URL ...]``.

The lessons show, request by request, that a prompt which changes early loses the KV cache. In
production nobody watches single requests; they watch the server. This monitor reads each
server's Prometheus ``/metrics`` every ``--interval`` seconds and shows, per server and in
total, what the cache did in the last interval and since the monitor started:

* **hit rate**: of the prompt tokens the engine looked up in its prefix cache, the share it
  found there, ``Δ vllm:prefix_cache_hits_total / Δ vllm:prefix_cache_queries_total``. It is
  token-weighted (a long prompt counts more than a short one, as its prefill costs more) and
  the total sums the servers' deltas before dividing: never an average of ratios, which would
  let an idle server or a tiny request pull the figure anywhere;
* requests per second (finished requests), prompt tokens per second and how many of them came
  from the cache (``vllm:prompt_tokens_total``, ``vllm:prompt_tokens_cached_total``);
* **TTFT p50 / p90** over the interval, from the increase of each bucket of the
  ``vllm:time_to_first_token_seconds`` histogram. vLLM exports buckets, not single times, so a
  quantile is only known to lie in one bucket: the table shows the bucket ``(lower, upper]``
  and an estimate interpolated inside it (as Prometheus's ``histogram_quantile`` does);
* running and waiting requests, KV-cache usage (gauges, as read), preemptions (per interval);
* the recent history of the hit rate as a sparkline.

What real deployments do is handled, not hidden: a server that restarts (its counters start
again at zero) is detected (a counter went down or its ``_created`` time changed) and the
interval counts from zero instead of going negative; a server that is down is shown as down
while the others keep updating; a server with prefix caching off says so and names the flag;
a URL that is not a vLLM server is an error before anything starts. Ctrl-C ends it cleanly.

Per-request cached tokens (``usage.prompt_tokens_details``, ``--enable-prompt-tokens-details``)
leave no trace in ``/metrics``; ``--check-details`` sends one 1-token request per server at start
to find out. ``--kv-events`` subscribes to vLLM's KV-cache events (ZMQ) and counts the blocks
stored and evicted per interval: a falling hit rate with evictions means the cache is too small
for the working set; without evictions, the prompts changed.

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
import io
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from harness import outputs
from harness.errors import UserError
from harness.metrics import (
    PREFIX_QUERIES,
    BucketQuantile,
    NotVllm,
    Scrape,
    Window,
    combined_kv_usage,
    scrape_from_text,
    side_by_side,
    then,
    window_between,
)

DEFAULT_INTERVAL_S = 2.0
DEFAULT_TIMEOUT_S = 3.0
SPARK = "▁▂▃▄▅▆▇█"
JSON_KIND = "kvcache-lessons monitor snapshot"
DASHBOARD_TITLE = "vLLM prefix-cache monitor"
CSV_COLUMNS = (
    "time",
    "elapsed_s",
    "server",
    "up",
    "restarted",
    "interval_s",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "hit_rate",
    "hit_rate_since_start",
    "requests",
    "requests_per_s",
    "prompt_tokens",
    "cached_prompt_tokens",
    "ttft_count",
    "ttft_p50_s",
    "ttft_p90_s",
    "running",
    "waiting",
    "kv_cache_usage",
    "preemptions",
    "kv_blocks_stored",
    "kv_blocks_evicted",
    "kv_blocks_restored",
)
PREFIX_CACHING_OFF = "prefix caching is off: start the server with --enable-prefix-caching"
NO_DETAILS = (
    "no per-request cached tokens (usage.prompt_tokens_details is null): "
    "start the server with --enable-prompt-tokens-details"
)


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
    return parser


@dataclass(frozen=True)
class Target:
    """One server to watch."""

    url: str  # base URL, e.g. http://127.0.0.1:8000
    kv_events: str | None = None  # ZMQ endpoint of its KV-cache events

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def metrics_url(self) -> str:
        return self.url + "/metrics"


def normalize_url(raw: str) -> str:
    """A server's base URL; ``/metrics`` or ``/v1`` at the end are accepted and removed."""
    text = raw.strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"not an http(s) URL: {raw!r} (e.g. http://127.0.0.1:8000)")
    try:
        _ = parts.port
    except ValueError as exc:
        raise UserError(f"bad port in {raw!r}") from exc
    if parts.query or parts.fragment:
        raise UserError(f"a server URL has no query or fragment: {raw!r}")
    path = parts.path.rstrip("/").removesuffix("/metrics").removesuffix("/v1").rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path}"


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
    return [Target(url, events.get(url)) for url in urls]


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
# Reading the servers


@dataclass(frozen=True)
class Reading:
    """One attempt to read one server: a scrape, or why there is none."""

    target: Target
    scrape: Scrape | None
    error: str | None = None
    not_vllm: bool = False


def read_server(target: Target, timeout: float) -> Reading:
    try:
        with urllib.request.urlopen(target.metrics_url, timeout=timeout) as resp:
            body = resp.read().decode("utf-8", errors="replace")
            wall = time.time()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return Reading(target, None, "answers, but has no /metrics (HTTP 404)", not_vllm=True)
        return Reading(target, None, f"/metrics answered HTTP {exc.code}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return Reading(target, None, f"unreachable: {reason}")
    try:
        return Reading(target, scrape_from_text(body, wall))
    except NotVllm:
        return Reading(target, None, "its /metrics has no vllm: metrics", not_vllm=True)


def read_all(targets: Sequence[Target], timeout: float, pool: ThreadPoolExecutor) -> list[Reading]:
    """Every server at once: a slow or dead one costs the others nothing but its timeout."""
    return list(pool.map(lambda t: read_server(t, timeout), targets))


def check_details(target: Target, timeout: float) -> str | None:
    """Send one 1-token completion with a private cache salt: does the usage carry
    ``prompt_tokens_details``? Returns a note when it does not, None when it does.

    Returns only once the probe shows in the server's counters (which the API server updates a
    moment after answering), so the monitor's baseline, read next, already holds it."""
    before = read_server(target, timeout).scrape
    models = json.loads(urllib.request.urlopen(target.url + "/v1/models", timeout=timeout).read())
    model = models["data"][0]["id"]
    body = {
        "model": model,
        "prompt": "Hi",
        "max_tokens": 1,
        "temperature": 0.0,
        # A salt of its own: the probe neither uses nor leaves anything other requests could hit.
        "cache_salt": f"kvmonitor-probe-{secrets.token_hex(8)}",
    }
    request = urllib.request.Request(
        target.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    usage = json.loads(urllib.request.urlopen(request, timeout=max(timeout, 30.0)).read()).get("usage") or {}
    details = usage.get("prompt_tokens_details")
    deadline = time.monotonic() + 5.0
    while before is not None and time.monotonic() < deadline:
        now = read_server(target, timeout).scrape
        if now is None or now.counters.requests > before.counters.requests:
            break
        time.sleep(0.1)
    if not isinstance(details, dict) or details.get("cached_tokens") is None:
        return NO_DETAILS
    return None


# --------------------------------------------------------------------------------------------
# KV-cache events (optional)


@dataclass(frozen=True)
class BlockCounts:
    """KV-cache blocks stored and evicted, from vLLM's KV events, over one interval.

    ``restored`` tells the two reasons for a miss apart: a block stored again after the monitor
    saw it evicted was a miss the cache's size caused (the same prefix, recomputed); a stored
    block never seen before is new content, which is what a changed prefix produces."""

    stored: int = 0
    evicted: int = 0
    restored: int = 0  # stored again after an eviction this monitor saw: capacity misses
    cleared: int = 0  # AllBlocksCleared events (a prefix-cache reset)
    missed_batches: int = 0  # gaps in the publisher's sequence numbers (events dropped)

    def __add__(self, other: BlockCounts) -> BlockCounts:
        return BlockCounts(
            self.stored + other.stored,
            self.evicted + other.evicted,
            self.restored + other.restored,
            self.cleared + other.cleared,
            self.missed_batches + other.missed_batches,
        )


# Evicted block hashes remembered to recognise re-stored blocks; a bound keeps memory flat.
MAX_REMEMBERED_EVICTIONS = 1_000_000


class KvEventCounter:
    """Subscribes to one server's ZMQ KV-event publisher in a thread and counts blocks.

    vLLM publishes ``(topic, 8-byte sequence number, msgpack batch)``; a batch is
    ``[timestamp, [event, ...], data_parallel_rank]`` and each event a map tagged by ``type``
    (``BlockStored`` and ``BlockRemoved`` with their ``block_hashes``, ``AllBlocksCleared``).
    Decoded with msgspec and pyzmq, which vLLM depends on, without importing vLLM.
    ZMQ subscribers see only what is published after they connect (no replay here)."""

    def __init__(self, endpoint: str) -> None:
        try:
            import msgspec
            import zmq
        except ImportError as exc:  # pragma: no cover - both come with vLLM
            raise UserError(f"--kv-events needs pyzmq and msgspec (installed with vLLM): {exc}") from exc
        self.endpoint = endpoint
        self._decode = msgspec.msgpack.Decoder().decode
        self._zmq = zmq
        self._socket: Any = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._lock = threading.Lock()
        self._counts = BlockCounts()
        self._evicted: set[Any] = set()
        self._last_seq: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-events {endpoint}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = self._zmq.Poller()
        poller.register(self._socket, self._zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(200)):
                continue
            frames = self._socket.recv_multipart()
            if len(frames) >= 3:
                self.count(int.from_bytes(frames[1], "big"), frames[2])

    def count(self, seq: int, payload: bytes) -> None:
        """Count one published batch (``seq``: the publisher's sequence number)."""
        try:
            batch = self._decode(payload)
            events = batch[1] if isinstance(batch, list) and len(batch) > 1 else []
        except Exception:
            return
        stored = evicted = restored = cleared = 0
        with self._lock:
            for event in events:
                kind = _event_type(event)
                hashes = _event_field(event, "block_hashes", 1)
                hashes = [h for h in hashes if isinstance(h, int | bytes)] if isinstance(hashes, list) else []
                if kind == "BlockStored":
                    stored += len(hashes)
                    for h in hashes:
                        if h in self._evicted:
                            restored += 1
                            self._evicted.discard(h)
                elif kind == "BlockRemoved":
                    evicted += len(hashes)
                    if len(self._evicted) + len(hashes) > MAX_REMEMBERED_EVICTIONS:
                        self._evicted.clear()
                    self._evicted.update(hashes)
                elif kind == "AllBlocksCleared":
                    cleared += 1
                    self._evicted.clear()  # a reset, not an eviction: recomputing is expected
            missed = 0
            if self._last_seq is not None and seq > self._last_seq + 1:
                missed = seq - self._last_seq - 1
            self._last_seq = seq
            self._counts = self._counts + BlockCounts(stored, evicted, restored, cleared, missed)

    def take(self) -> BlockCounts:
        """The counts since the last call."""
        with self._lock:
            counts, self._counts = self._counts, BlockCounts()
        return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)


def _event_type(event: Any) -> str | None:
    if isinstance(event, dict):
        return str(event.get("type"))
    if isinstance(event, list) and event and isinstance(event[0], str):
        return event[0]  # tagged array form
    return None


def _event_field(event: Any, name: str, position: int) -> Any:
    if isinstance(event, dict):
        return event.get(name)
    if isinstance(event, list) and len(event) > position:
        return event[position]
    return None


# --------------------------------------------------------------------------------------------
# Per-server state and what a row shows


@dataclass(frozen=True)
class ServerView:
    """One row of the dashboard (and of the CSV, and one JSON entry)."""

    name: str
    url: str | None  # None for the total
    state: str  # "up", "restarted", "down", "not vLLM", or "k/n up" for the total
    up: bool
    window: Window | None  # the last interval (or the snapshot's window)
    overall: Window | None  # since the monitor started (or since the server started)
    running: float | None
    waiting: float | None
    kv_usage: float | None
    kv_blocks: int | None
    prefix_caching: bool | None
    history: tuple[float | None, ...]
    notes: tuple[str, ...]
    events: BlockCounts | None = None


class ServerTrack:
    """What the monitor remembers about one server between readings."""

    def __init__(self, target: Target, started_wall: float, history: int) -> None:
        self.target = target
        self.started_wall = started_wall  # when the monitor started (time.time())
        self.last: Scrape | None = None
        self.overall: Window | None = None
        self.history: deque[float | None] = deque(maxlen=history)
        self.readings = 0
        self.restarts: list[float] = []
        self.down_since: float | None = None
        self.details_note: str | None = None
        self.events: KvEventCounter | None = None
        self.events_total: BlockCounts | None = None
        self.last_view: ServerView | None = None

    def observe(self, reading: Reading) -> ServerView:
        self.readings += 1
        events = self.events.take() if self.events is not None else None
        if events is not None:
            self.events_total = events if self.events_total is None else self.events_total + events
        scrape = reading.scrape
        if scrape is None:
            if self.down_since is None:
                self.down_since = time.time()
            self.history.append(None)
            state = "not vLLM" if reading.not_vllm else "down"
            since = datetime.fromtimestamp(self.down_since).strftime("%H:%M:%S")
            notes = (f"{self.target.name}: {state} since {since}: {reading.error}", *self._notes(None))
            return self._view(state, False, None, None, notes, events)
        self.down_since = None
        window: Window | None = None
        if self.last is not None:
            window = window_between(self.last, scrape)
            if window.restarted:
                self.restarts.append(scrape.wall)
        elif self.readings > 1 and scrape.started_at is not None and scrape.started_at >= self.started_wall:
            # First seen after the monitor started, and started after it too: every count on it
            # belongs to the monitor's time.
            window = window_between(None, scrape)
        self.last = scrape
        if window is not None:
            self.overall = window if self.overall is None else then(self.overall, window)
            self.history.append(window.hit_rate)
        state = "restarted" if window is not None and window.restarted else "up"
        return self._view(state, True, window, scrape, self._notes(scrape), events)

    def snapshot(self, reading: Reading) -> ServerView:
        """``--once`` without ``--duration``: the counters since the server started."""
        if reading.scrape is None:
            return self.observe(reading)
        self.last = reading.scrape
        window = window_between(None, reading.scrape)
        self.overall = window
        self.history.append(window.hit_rate)
        return self._view("up", True, window, reading.scrape, self._notes(reading.scrape), None)

    def _notes(self, scrape: Scrape | None) -> tuple[str, ...]:
        name = self.target.name
        notes: list[str] = []
        latest = scrape or self.last
        if latest is not None:
            if latest.prefix_caching is False:
                notes.append(f"{name}: {PREFIX_CACHING_OFF}")
            for series in latest.missing:
                why = "no hit rate (vLLM V1 publishes it)" if series == PREFIX_QUERIES else "not shown"
                notes.append(f"{name}: no {series} in /metrics: {why}")
        if self.restarts:
            at = datetime.fromtimestamp(self.restarts[-1]).strftime("%H:%M:%S")
            notes.append(
                f"{name}: restarted {len(self.restarts)}x (last seen at {at}): counters began again at "
                "zero; that interval counts from zero"
            )
        if self.details_note:
            notes.append(f"{name}: {self.details_note}")
        return tuple(notes)

    def _view(
        self,
        state: str,
        up: bool,
        window: Window | None,
        scrape: Scrape | None,
        notes: tuple[str, ...],
        events: BlockCounts | None,
    ) -> ServerView:
        latest = scrape or self.last
        self.last_view = ServerView(
            name=self.target.name,
            url=self.target.url,
            state=state,
            up=up,
            window=window,
            overall=self.overall,
            running=scrape.running if scrape else None,
            waiting=scrape.waiting if scrape else None,
            kv_usage=scrape.kv_usage if scrape else None,
            kv_blocks=latest.kv_blocks if latest else None,
            prefix_caching=latest.prefix_caching if latest else None,
            history=tuple(self.history),
            notes=notes,
            events=events,
        )
        return self.last_view


def total_view(views: Sequence[ServerView], history: deque[float | None]) -> ServerView:
    """All servers as one: deltas summed first (token-weighted), gauges summed."""
    up = [v for v in views if v.up]
    window = side_by_side([v.window for v in up if v.window is not None])
    overall = side_by_side([v.overall for v in views if v.overall is not None])
    history.append(window.hit_rate if window is not None else None)

    def total(values: list[float | None]) -> float | None:
        known = [x for x in values if x is not None]
        return sum(known) if known else None

    events = [v.events for v in views if v.events is not None]
    return ServerView(
        name="total",
        url=None,
        state=f"{len(up)}/{len(views)} up",
        up=bool(up),
        window=window,
        overall=overall,
        running=total([v.running for v in up]),
        waiting=total([v.waiting for v in up]),
        kv_usage=combined_kv_usage([(v.kv_usage, v.kv_blocks) for v in up]),
        kv_blocks=None,
        prefix_caching=None,
        history=tuple(history),
        notes=(),
        events=sum(events[1:], events[0]) if events else None,
    )


# --------------------------------------------------------------------------------------------
# Showing it


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_rate(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def fmt_bound(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def fmt_quantile(bq: BucketQuantile | None) -> str:
    if bq is None:
        return "-"
    if math.isinf(bq.upper):
        return f">{fmt_bound(bq.lower)} s"
    return f"{bq.estimate:.2f} ({fmt_bound(bq.lower)},{fmt_bound(bq.upper)}]"


def fmt_blocks(b: BlockCounts) -> str:
    return f"+{b.stored} -{b.evicted} ({b.restored})"


def sparkline(history: Sequence[float | None]) -> str:
    return "".join("·" if h is None else SPARK[min(len(SPARK) - 1, int(h * len(SPARK)))] for h in history)


def hit_cell(view: ServerView, window: Window | None) -> str:
    if view.prefix_caching is False:
        return "off"
    return fmt_pct(window.hit_rate if window else None)


def row_cells(view: ServerView) -> list[str]:
    w = view.window
    counters = w.counters if w else None
    prompt_rate = w.rate("prompt_tokens") if w else None
    cached_rate = w.rate("cached_prompt_tokens") if w else None
    cells = [
        view.name,
        view.state,
        hit_cell(view, w),
        hit_cell(view, view.overall),
        fmt_rate(w.rate("requests") if w else None, 2),
        fmt_rate(prompt_rate, 0),
        fmt_rate(cached_rate, 0),
        fmt_quantile(w.quantile(0.5) if w else None),
        fmt_quantile(w.quantile(0.9) if w else None),
        fmt_rate(view.running, 0),
        fmt_rate(view.waiting, 0),
        fmt_pct(view.kv_usage),
        fmt_rate(counters.preemptions if counters else None, 0),
    ]
    if view.events is not None:
        cells.append(fmt_blocks(view.events))
    cells.append(sparkline(view.history))
    return cells


def dashboard(views: Sequence[ServerView], total: ServerView, what: str) -> Group:
    """The table (a row per server, the total) and the notes under it; ``what`` says which
    window the figures cover."""
    table = Table(
        title=f"{DASHBOARD_TITLE}, {datetime.now().strftime('%H:%M:%S')}: {what}",
        title_justify="left",
        caption=(
            "hit = Δprefix_cache_hits / Δprefix_cache_queries (tokens), summed before dividing; "
            "TTFT quantiles are bucket-resolution: estimate (bucket lower, upper] s"
        ),
        caption_justify="left",
    )
    columns = [
        ("server", "left"),
        ("state", "left"),
        ("hit", "right"),
        ("hit (all)", "right"),
        ("req/s", "right"),
        ("prompt/s", "right"),
        ("cached/s", "right"),
        ("TTFT p50 s", "right"),
        ("TTFT p90 s", "right"),
        ("run", "right"),
        ("wait", "right"),
        ("KV use", "right"),
        ("preempt", "right"),
    ]
    if any(v.events is not None for v in views):
        columns.append(("blocks +new -evicted (re-stored)", "right"))
    columns.append(("hit history", "left"))
    for header, justify in columns:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for view in views:
        style = None if view.up else "red"
        table.add_row(*(escape(c) for c in row_cells(view)), style=style)
    if len(views) > 1:
        table.add_section()
        table.add_row(*(escape(c) for c in row_cells(total)), style="bold")
    notes = [n for v in views for n in v.notes]
    parts: list[Any] = [table]
    if notes:
        parts.append(Text("\n".join(notes), style="yellow"))
    return Group(*parts)


def plain_line(views: Sequence[ServerView], total: ServerView, elapsed: float) -> str:
    """One line per interval for logs (no terminal): the total in full, each server in brief."""

    def brief(v: ServerView) -> str:
        if not v.up:
            return f"{v.name} {v.state.upper()}"
        w = v.window
        rate = w.rate("requests") if w else None
        return (
            f"{v.name} {v.state} hit {hit_cell(v, w)} req/s {fmt_rate(rate, 2)} "
            f"p50 {fmt_quantile(w.quantile(0.5) if w else None)}"
        )

    w = total.window
    since_start = total.overall.hit_rate if total.overall else None
    head = (
        f"{datetime.now().strftime('%H:%M:%S')} +{elapsed:.0f}s total {total.state}: "
        f"hit {fmt_pct(w.hit_rate if w else None)} (since start {fmt_pct(since_start)})"
    )
    if w is not None:
        head += (
            f", req/s {fmt_rate(w.rate('requests'), 2)}"
            f", prompt tok/s {fmt_rate(w.rate('prompt_tokens'), 0)}"
            f" (cached {fmt_rate(w.rate('cached_prompt_tokens'), 0)})"
            f", TTFT p50 {fmt_quantile(w.quantile(0.5))} p90 {fmt_quantile(w.quantile(0.9))}"
        )
    if total.events is not None:
        head += f", KV blocks {fmt_blocks(total.events)}"
    return " | ".join([head, *(brief(v) for v in views)])


# --------------------------------------------------------------------------------------------
# Writing it down


def window_json(window: Window | None) -> dict[str, Any]:
    if window is None:
        return {
            "window_s": None,
            "prefix_cache_queries": None,
            "prefix_cache_hits": None,
            "hit_rate": None,
            "requests": None,
            "prompt_tokens": None,
            "cached_prompt_tokens": None,
            "preemptions": None,
            "ttft_count": None,
            "ttft_p50_s": None,
            "ttft_p90_s": None,
            "ttft_p50_bucket_s": None,
            "ttft_p90_bucket_s": None,
        }
    c = window.counters
    p50, p90 = window.quantile(0.5), window.quantile(0.9)

    def bucket(bq: BucketQuantile | None) -> list[float | None] | None:
        return None if bq is None else [bq.lower, None if math.isinf(bq.upper) else bq.upper]

    return {
        "window_s": round(window.seconds, 3),
        "prefix_cache_queries": int(c.prefix_cache_queries),
        "prefix_cache_hits": int(c.prefix_cache_hits),
        "hit_rate": window.hit_rate,
        "requests": int(c.requests),
        "prompt_tokens": int(c.prompt_tokens),
        "cached_prompt_tokens": int(c.cached_prompt_tokens),
        "preemptions": int(c.preemptions),
        "ttft_count": int(window.ttft.count) if window.ttft else None,
        "ttft_p50_s": p50.estimate if p50 else None,
        "ttft_p90_s": p90.estimate if p90 else None,
        "ttft_p50_bucket_s": bucket(p50),
        "ttft_p90_bucket_s": bucket(p90),
    }


def view_json(view: ServerView) -> dict[str, Any]:
    out: dict[str, Any] = {"url": view.url, "up": view.up, "state": view.state}
    if view.url is None:
        out = {"up": view.up, "servers_up": view.state}
    out.update(window_json(view.overall))
    out.update(
        {
            "prefix_caching": view.prefix_caching,
            "running": view.running,
            "waiting": view.waiting,
            "kv_cache_usage": view.kv_usage,
            "notes": list(view.notes),
        }
    )
    if view.events is not None:
        e = view.events
        out["kv_blocks"] = {
            "stored": e.stored,
            "evicted": e.evicted,
            "restored_after_eviction": e.restored,
            "cleared": e.cleared,
            "missed_batches": e.missed_batches,
        }
    return out


def snapshot_json(
    views: Sequence[ServerView], total: ServerView, window: str, interval: float
) -> dict[str, Any]:
    return {
        "kind": JSON_KIND,
        "written_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "window": window,
        "interval_s": interval,
        "hit_rate_definition": "prefix_cache_hits / prefix_cache_queries over the window (tokens)",
        "ttft_quantiles": "bucket-resolution: linear interpolation inside the histogram bucket; "
        "*_bucket_s gives the bucket (lower, upper], upper null = +Inf",
        "servers": [view_json(v) for v in views],
        "total": view_json(total),
    }


class CsvRecorder:
    """Appends one row per server per interval, flushed at once (a crash loses nothing)."""

    def __init__(self, path: Path) -> None:
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(CSV_COLUMNS)
            self._file.flush()

    def write(self, views: Sequence[ServerView], elapsed: float) -> None:
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        for v in views:
            w = v.window
            c = w.counters if w else None
            p50 = w.quantile(0.5) if w else None
            p90 = w.quantile(0.9) if w else None
            row: list[object] = [
                now,
                f"{elapsed:.3f}",
                v.url,
                int(v.up),
                int(bool(w and w.restarted)),
                f"{w.seconds:.3f}" if w else "",
                _num(c.prefix_cache_queries if c else None),
                _num(c.prefix_cache_hits if c else None),
                _num(w.hit_rate if w else None),
                _num(v.overall.hit_rate if v.overall else None),
                _num(c.requests if c else None),
                _num(w.rate("requests") if w else None),
                _num(c.prompt_tokens if c else None),
                _num(c.cached_prompt_tokens if c else None),
                _num(w.ttft.count if w and w.ttft else None),
                _num(p50.estimate if p50 else None),
                _num(p90.estimate if p90 else None),
                _num(v.running),
                _num(v.waiting),
                _num(v.kv_usage),
                _num(c.preemptions if c else None),
                _num(v.events.stored if v.events else None),
                _num(v.events.evicted if v.events else None),
                _num(v.events.restored if v.events else None),
            ]
            self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


@dataclass(frozen=True)
class PlotPoint:
    elapsed: float
    name: str
    up: bool
    restarted: bool
    hit_rate: float | None
    p50: float | None
    p90: float | None
    events: BlockCounts | None


@dataclass
class Timeline:
    """What --plot draws: per interval, each server's and the total's figures."""

    points: list[PlotPoint] = field(default_factory=list)

    def add(self, views: Sequence[ServerView], elapsed: float) -> None:
        for v in views:
            w = v.window
            p50, p90 = (w.quantile(0.5), w.quantile(0.9)) if w else (None, None)
            self.points.append(
                PlotPoint(
                    elapsed=elapsed,
                    name=v.name,
                    up=v.up,
                    restarted=bool(w and w.restarted),
                    hit_rate=w.hit_rate if w else None,
                    p50=p50.estimate if p50 else None,
                    p90=p90.estimate if p90 else None,
                    events=v.events,
                )
            )


def _nan(x: float | None, scale: float = 1.0) -> float:
    return math.nan if x is None else x * scale


def draw_plot(timeline: Timeline, path: Path, title: str, interval: float) -> None:
    """Hit rate and TTFT per interval; with --kv-events also the blocks stored, evicted and
    re-stored. Spans where a server was down are shaded, restarts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(p.name for p in timeline.points))
    servers = [n for n in names if n != "total"]
    with_events = any(p.events is not None for p in timeline.points)
    rows = 3 if with_events else 2
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.6 * rows + 1.2), sharex=True)
    ax_hit, ax_ttft = axes[0], axes[1]
    colors = {name: ("black" if name == "total" else f"C{i}") for i, name in enumerate(names)}
    for name in names:
        pts = [p for p in timeline.points if p.name == name]
        xs = [p.elapsed for p in pts]
        total = name == "total"
        width = 2.2 if total else 1.2
        ax_hit.plot(xs, [_nan(p.hit_rate, 100) for p in pts], marker="o", markersize=2.5,
                    color=colors[name], linewidth=width, label=name)  # fmt: skip
        if total or len(servers) == 1:
            ax_ttft.plot(xs, [_nan(p.p50) for p in pts], color=colors[name], linewidth=width,
                         marker="o", markersize=2.5, label=f"{name} p50")  # fmt: skip
            ax_ttft.plot(xs, [_nan(p.p90) for p in pts], color=colors[name], linewidth=width,
                         linestyle="--", label=f"{name} p90")  # fmt: skip
        else:
            ax_ttft.plot(xs, [_nan(p.p50) for p in pts], color=colors[name], linewidth=0.9,
                         alpha=0.7, label=f"{name} p50")  # fmt: skip
        if with_events and (total or len(servers) == 1):
            ax_kv = axes[2]
            ax_kv.step(xs, [p.events.stored if p.events else math.nan for p in pts], where="mid",
                       color="C2", label="stored")  # fmt: skip
            ax_kv.step(xs, [p.events.evicted if p.events else math.nan for p in pts], where="mid",
                       color="C3", label="evicted")  # fmt: skip
            ax_kv.step(xs, [p.events.restored if p.events else math.nan for p in pts], where="mid",
                       color="C4", linestyle="--", label="stored again after eviction")  # fmt: skip
    for name in servers:
        pts = [p for p in timeline.points if p.name == name]
        labelled = False
        for p in pts:
            if not p.up:
                for ax in axes:
                    ax.axvspan(p.elapsed - interval, p.elapsed, color=colors[name], alpha=0.12, lw=0,
                               label=None if labelled or ax is not ax_hit else f"{name} down")  # fmt: skip
                labelled = True
            if p.restarted:
                for ax in axes:
                    ax.axvline(p.elapsed, color=colors[name], linestyle=":", linewidth=1.5,
                               label=f"{name} restarted" if ax is ax_hit else None)  # fmt: skip
    ax_hit.set_ylabel("prefix-cache hit rate\nper interval (%)")
    ax_hit.set_ylim(-3, 103)
    ax_ttft.set_ylabel("TTFT per interval (s)\nbucket-interpolated")
    if with_events:
        axes[2].set_ylabel("KV blocks per interval\n(all servers)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    axes[-1].set_xlabel("seconds since the monitor started")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_dashboard(renderable: Any, path: Path) -> None:
    # Wide enough for every column; a table takes only the width it needs.
    recorder = Console(record=True, width=240, file=io.StringIO(), force_terminal=True, highlight=False)
    recorder.print(renderable)
    suffix = path.suffix.lower()
    if suffix == ".svg":
        recorder.save_svg(str(path), title=DASHBOARD_TITLE)
    elif suffix == ".html":
        recorder.save_html(str(path))
    else:
        recorder.save_text(str(path))


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
        if args.check_details:
            for track, reading in zip(tracks, first, strict=True):
                if reading.scrape is not None:
                    try:
                        track.details_note = check_details(track.target, args.timeout)
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
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A log has no width; the table needs about 170 columns to show every figure unclipped.
        console = Console(highlight=False, width=200)
    from harness.cli import run_cli

    return run_cli(lambda args: run_monitor(args, console), list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
