"""Reading the servers' ``/metrics``, and what the monitor remembers about each between readings.

Every interval all servers are read at once (``read_all``). A reading is reduced to a ``Scrape``
(``harness.metrics``); a ``ServerTrack`` turns each into a ``ServerView`` over the interval since
the one before: a row of the dashboard and of the CSV, an entry of the JSON. ``total_view``
makes all servers one.

What real deployments do is handled, not hidden: a server that restarts (its counters start
again at zero) is detected (a counter went down or its ``_created`` time changed) and the
interval counts from zero instead of going negative; a server that is down is shown as down
while the others keep updating; a server with prefix caching off says so and names the flag;
a URL that answers without vLLM metrics is told apart from a server that is down (``not_vllm``).

Per-request cached tokens (``usage.prompt_tokens_details``, ``--enable-prompt-tokens-details``)
leave no trace in ``/metrics``; ``--check-details`` sends one 1-token request per server at start
to find out (``check_details``).

A server behind a proxy that guards ``/metrics`` too (vLLM's own ``--api-key`` leaves it open)
gets the key as a Bearer token (``Target.api_key``, see ``harness.api_key``); a refused key is an
error at start (``Reading.refused``).
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from harness.api_key import NO_API_KEY, REFUSED_STATUSES, ApiKey
from harness.errors import UserError
from harness.metrics import (
    PREFIX_QUERIES,
    NotVllm,
    Scrape,
    Window,
    combined_kv_usage,
    scrape_from_text,
    side_by_side,
    then,
    window_between,
)
from harness.monitor.kv_events import BlockCounts, KvEventCounter

PREFIX_CACHING_OFF = "prefix caching is off: start the server with --enable-prefix-caching"
NO_DETAILS = (
    "no per-request cached tokens (usage.prompt_tokens_details is null): "
    "start the server with --enable-prompt-tokens-details"
)


# --------------------------------------------------------------------------------------------
# Reading the servers


@dataclass(frozen=True)
class Target:
    """One server to watch."""

    url: str  # base URL, e.g. http://127.0.0.1:8000
    kv_events: str | None = None  # ZMQ endpoint of its KV-cache events
    api_key: ApiKey = field(default=NO_API_KEY, compare=False)  # sent with every request

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


@dataclass(frozen=True)
class Reading:
    """One attempt to read one server: a scrape, or why there is none."""

    target: Target
    scrape: Scrape | None
    error: str | None = None
    not_vllm: bool = False
    refused: int | None = None  # the HTTP status (401, 403) of a /metrics that refused the key


def _request(target: Target, path: str, body: dict[str, object] | None = None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.Request(target.url + path, data, headers | target.api_key.headers())


def read_server(target: Target, timeout: float) -> Reading:
    try:
        with urllib.request.urlopen(_request(target, "/metrics"), timeout=timeout) as resp:
            body = resp.read().decode("utf-8", errors="replace")
            wall = time.time()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return Reading(target, None, "answers, but has no /metrics (HTTP 404)", not_vllm=True)
        refused = exc.code if exc.code in REFUSED_STATUSES else None
        return Reading(target, None, f"/metrics answered HTTP {exc.code}", refused=refused)
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
    moment after answering), so the monitor's baseline, read next, already holds it. A refused
    key is a ``UserError`` (vLLM checks it on ``/v1``)."""
    before = read_server(target, timeout).scrape
    try:
        models = json.loads(urllib.request.urlopen(_request(target, "/v1/models"), timeout=timeout).read())
    except urllib.error.HTTPError as exc:
        if exc.code in REFUSED_STATUSES:
            raise target.api_key.refused(target.url, exc.code) from None
        raise
    model = models["data"][0]["id"]
    body = {
        "model": model,
        "prompt": "Hi",
        "max_tokens": 1,
        "temperature": 0.0,
        # A salt of its own: the probe neither uses nor leaves anything other requests could hit.
        "cache_salt": f"kvmonitor-probe-{secrets.token_hex(8)}",
    }
    request = _request(target, "/v1/completions", body)
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
