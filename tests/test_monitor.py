"""The monitor (``python -m harness.monitor``): the /metrics maths, then what real deployments do
(restarts, a dead server among live ones, prefix caching off, no prompt-token details, a URL that
is not vLLM) against a fake vLLM /metrics page served from a thread, then the monitor against a
real vLLM server with requests whose cached tokens are known."""

from __future__ import annotations

import csv
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, key_env, run_script, validate

from harness.metrics import (
    Counters,
    Histogram,
    Scrape,
    Window,
    bucket_quantile,
    histogram_of,
    metric_label,
    parse_prometheus,
    parse_samples,
    scrape_from_text,
    side_by_side,
    window_between,
)
from harness.monitor import (
    CSV_COLUMNS,
    NO_DETAILS,
    PREFIX_CACHING_OFF,
    BlockCounts,
    KvEventCounter,
    Reading,
    ServerTrack,
    Target,
    check_details,
    hit_cell,
    read_server,
    total_view,
)
from harness.servers import ServerProcess

# vLLM 0.32's default TTFT buckets (vllm/v1/metrics/buckets.py), as its /metrics prints them.
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip

# A real line from a vLLM 0.32 server (SmolLM2, CPU): label values with brackets and dots.
REAL_CACHE_CONFIG = (
    'vllm:cache_config_info{_block_size_resolved="True",block_size="32",cache_dtype="auto",'
    'cache_hit_alignment_tokens="None",effective_attention_block_size="32",'
    'enable_mamba_shared_prefix_checkpoint="False",enable_prefix_caching="{caching}",engine="0",'
    'gpu_memory_utilization="0.92",hash_block_size="None",is_attention_free="False",'
    'kv_cache_dtype_skip_layers="[]",kv_cache_layout="None",kv_cache_max_concurrency="5.6875",'
    'kv_cache_memory_bytes="2147483648",kv_cache_size_tokens="46592",kv_offloading_backend="native",'
    'num_cpu_blocks="None",num_gpu_blocks="1456",prefix_caching_hash_algo="sha256",'
    'user_specified_block_size="True"} 1.0'
)


# --- a fake vLLM /metrics page ------------------------------------------------------------------


@dataclass
class FakeState:
    """What the fake server's /metrics says. Tests move these numbers as an engine would."""

    queries: int = 0
    hits: int = 0
    prompt: int = 0
    cached: int = 0
    requests: int = 0
    preemptions: int = 0
    ttfts: list[float] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    created: float = 1_795_000_000.0  # the counters' _created time: the process's start
    prefix_caching: bool = True
    details: bool = True  # --enable-prompt-tokens-details
    engines: int = 1  # data-parallel engines: one label set each, the monitor sums them
    mode: str = "vllm"  # "vllm", "html" (a web page), "404" (no /metrics)
    # A reverse proxy in front that wants "Authorization: Bearer <guard>" on every path, /metrics
    # included (vLLM's own --api-key leaves /metrics open: that case is the real server's test).
    guard: str | None = None
    # Added on every /metrics read: a server under steady load, for runs of the real CLI.
    step: tuple[int, int] = (0, 0)  # (queries, hits) per read


def metrics_page(s: FakeState) -> str:
    """A /metrics page in vLLM 0.32's exact names, labels and layout (one engine's share each)."""
    lines: list[str] = []
    share = s.engines

    def series(name: str, kind: str, value: float, extra: str = "", split: bool = True) -> None:
        lines.append(f"# HELP {name} fake\n# TYPE {name} {kind}")
        for e in range(share):
            v = value / share if split else value
            lines.append(f'{name}{{engine="{e}",{extra}model_name="/models/SmolLM2"}} {float(v)!r}')

    def counter(base: str, value: float) -> None:
        series(base + "_total", "counter", value)
        # as in vLLM, each counter is created a few microseconds after the one before
        series(base + "_created", "gauge", s.created + len(lines) * 1e-6, split=False)

    series("vllm:num_requests_running", "gauge", s.running)
    series("vllm:num_requests_waiting", "gauge", s.waiting)
    series("vllm:kv_cache_usage_perc", "gauge", s.kv_usage * share)
    counter("vllm:prefix_cache_queries", s.queries)
    counter("vllm:prefix_cache_hits", s.hits)
    counter("vllm:num_preemptions", s.preemptions)
    counter("vllm:prompt_tokens", s.prompt)
    counter("vllm:prompt_tokens_cached", s.cached)
    for reason, value in (("stop", 0), ("length", s.requests), ("abort", 0)):
        series("vllm:request_success_total", "counter", value, f'finished_reason="{reason}",')
    lines.append("# TYPE vllm:time_to_first_token_seconds histogram")
    for e in range(share):
        mine = s.ttfts[e::share]
        for bound in (*TTFT_BOUNDS, math.inf):
            le = "+Inf" if math.isinf(bound) else repr(bound)
            n = sum(1 for t in mine if t <= bound)
            lines.append(
                f'vllm:time_to_first_token_seconds_bucket{{engine="{e}",le="{le}",'
                f'model_name="/models/SmolLM2"}} {float(n)!r}'
            )
        lines.append(
            f'vllm:time_to_first_token_seconds_count{{engine="{e}",model_name="m"}} {float(len(mine))!r}'
        )
        lines.append(
            f'vllm:time_to_first_token_seconds_sum{{engine="{e}",model_name="m"}} {float(sum(mine))!r}'
        )
    lines.append(REAL_CACHE_CONFIG.replace("{caching}", str(s.prefix_caching)))
    return "\n".join(lines) + "\n"


class FakeVllm:
    """A vLLM-shaped HTTP server in a thread: /metrics, /v1/models, /v1/completions. It can go
    down (port closed: connection refused) and come back on the same port, or restart."""

    def __init__(self) -> None:
        self.state = FakeState()
        self.lock = threading.Lock()
        self.port = 0
        self.completions = 0
        self._server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: str, kind: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def refused(self) -> bool:
                guard = fake.state.guard
                if guard is None or self.headers.get("Authorization") == f"Bearer {guard}":
                    return False
                self._send(401, '{"error":"Unauthorized"}', "application/json")
                return True

            def do_GET(self) -> None:
                with fake.lock:
                    s = fake.state
                    if self.refused():
                        return
                    if s.mode == "html":
                        self._send(200, "<html><body>hello</body></html>", "text/html")
                    elif s.mode == "404" or self.path not in ("/metrics", "/v1/models"):
                        self._send(404, '{"detail":"Not Found"}', "application/json")
                    elif self.path == "/v1/models":
                        self._send(200, json.dumps({"data": [{"id": "/models/SmolLM2"}]}), "application/json")
                    else:
                        page = metrics_page(s)
                        s.queries += s.step[0]
                        s.hits += s.step[1]
                        self._send(200, page, "text/plain; version=0.0.4")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                with fake.lock:
                    if self.refused():
                        return
                    fake.completions += 1
                    details = {"cached_tokens": 0} if fake.state.details else None
                usage = {"prompt_tokens": 1, "completion_tokens": 1, "prompt_tokens_details": details}
                self._send(200, json.dumps({"choices": [{"text": "!"}], "usage": usage}), "application/json")

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self, after: FakeState | None = None) -> None:
        """A new process: every counter from zero, a new creation time."""
        with self.lock:
            self.state = after or FakeState(created=self.state.created + 3600)

    def serve(self, **changes: object) -> None:
        """Some traffic: add to the counters."""
        with self.lock:
            for key, value in changes.items():
                if key == "ttfts":
                    assert isinstance(value, list)
                    self.state.ttfts = [*self.state.ttfts, *value]
                else:
                    setattr(self.state, key, getattr(self.state, key) + value)


@pytest.fixture
def fakes() -> Iterator[list[FakeVllm]]:
    started: list[FakeVllm] = []
    yield started
    for f in started:
        f.stop()


def new_fake(fakes: list[FakeVllm]) -> FakeVllm:
    fake = FakeVllm()
    fakes.append(fake)
    return fake


def dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def read(target: Target) -> Reading:
    return read_server(target, timeout=3.0)


# --- parsing ------------------------------------------------------------------------------------


def test_labels_with_commas_brackets_and_escapes() -> None:
    text = (
        "# HELP x\n"
        'vllm:cache_config_info{a="1,2",b="[x, y]",c="say \\"hi\\"",d="back\\\\slash"} 1.0 1700000000\n'
        "plain_metric 3\n"
        "broken{ 4\n"
    )
    samples = parse_samples(text)
    assert [(s.name, s.value) for s in samples] == [("vllm:cache_config_info", 1.0), ("plain_metric", 3.0)]
    info = samples[0]
    assert info.label("a") == "1,2"
    assert info.label("b") == "[x, y]"
    assert info.label("c") == 'say "hi"'
    assert info.label("d") == "back\\slash"


def test_real_cache_config_line_and_engine_sums() -> None:
    state = FakeState(queries=302, hits=128, engines=2)
    page = metrics_page(state)
    assert metric_label(page, "vllm:cache_config_info", "block_size") == "32"
    assert metric_label(page, "vllm:cache_config_info", "enable_prefix_caching") == "True"
    assert metric_label(page, "vllm:cache_config_info", "kv_cache_dtype_skip_layers") == "[]"
    totals = parse_prometheus(page)
    assert totals["vllm:prefix_cache_queries_total"] == 302  # two engines' 151 each, summed
    assert totals["vllm:prefix_cache_hits_total"] == 128


def test_histogram_sums_label_sets_and_subtracts() -> None:
    state = FakeState(ttfts=[0.03, 0.3, 0.3, 3.0], engines=2)
    hist = histogram_of(parse_samples(metrics_page(state)), "vllm:time_to_first_token_seconds")
    assert hist is not None
    assert hist.count == 4 and math.isclose(hist.total, 3.63)
    assert dict(zip(hist.bounds, hist.cumulative, strict=True))[0.5] == 3
    later = histogram_of(
        parse_samples(metrics_page(FakeState(ttfts=[0.03, 0.3, 0.3, 3.0, 0.07], engines=2))),
        "vllm:time_to_first_token_seconds",
    )
    assert later is not None
    delta = later - hist
    assert delta.count == 1
    assert [b for b, c in zip(delta.bounds, delta.cumulative, strict=True) if c == 1][0] == 0.08


# --- quantiles ----------------------------------------------------------------------------------


def hist_of(values: list[float]) -> Histogram:
    bounds = (*TTFT_BOUNDS, math.inf)
    cumulative = tuple(float(sum(1 for v in values if v <= b)) for b in bounds)
    return Histogram(bounds, cumulative, float(len(values)), sum(values))


def test_quantile_is_the_bucket_holding_the_rank_with_prometheus_interpolation() -> None:
    # 10 observations: 4 in (0.1, 0.25], 5 in (0.25, 0.5], 1 in (2.5, 5]
    values = [0.2] * 4 + [0.3] * 5 + [3.0]
    hist = hist_of(values)
    p50 = bucket_quantile(hist, 0.5)
    assert p50 is not None
    # rank 5 falls in (0.25, 0.5], the 1st of its 5: 0.25 + 0.25 * 1/5
    assert (p50.lower, p50.upper) == (0.25, 0.5)
    assert math.isclose(p50.estimate, 0.30)
    p90 = bucket_quantile(hist, 0.9)
    assert p90 is not None and (p90.lower, p90.upper) == (0.25, 0.5) and math.isclose(p90.estimate, 0.5)
    p95 = bucket_quantile(hist, 0.95)
    assert p95 is not None and (p95.lower, p95.upper) == (2.5, 5.0)
    assert math.isclose(p95.estimate, 2.5 + 2.5 * 0.5)
    # the true quantiles lie in the buckets given
    ordered = sorted(values)
    for bq in (p50, p90, p95):
        assert bq.contains(ordered[math.ceil(bq.q * len(ordered)) - 1])


def test_quantile_edges() -> None:
    assert bucket_quantile(hist_of([]), 0.5) is None
    first = bucket_quantile(hist_of([0.0005]), 0.5)
    assert first is not None and (first.lower, first.upper) == (0.0, 0.001)
    over = bucket_quantile(hist_of([5000.0, 5000.0]), 0.5)
    assert over is not None and over.lower == 2560.0 and math.isinf(over.upper) and over.estimate == 2560.0
    with pytest.raises(ValueError):
        bucket_quantile(hist_of([1.0]), 1.0)


def test_empty_buckets_between_do_not_move_the_quantile() -> None:
    # one fast, one slow: p50 is the fast one's bucket, not an empty one in between
    p50 = bucket_quantile(hist_of([0.003, 30.0]), 0.5)
    assert p50 is not None and (p50.lower, p50.upper) == (0.001, 0.005)


# --- counter deltas, hit rate and restarts ------------------------------------------------------


def scrape(state: FakeState, wall: float) -> Scrape:
    return scrape_from_text(metrics_page(state), wall)


def test_window_is_counter_deltas_and_hit_rate_is_token_weighted() -> None:
    a = scrape(FakeState(queries=1000, hits=200, prompt=1000, cached=200, requests=3, ttfts=[1.0] * 3), 100.0)
    b = scrape(
        FakeState(queries=1600, hits=680, prompt=1600, cached=680, requests=5, ttfts=[1.0] * 3 + [0.3, 0.4]),
        102.0,
    )
    w = window_between(a, b)
    assert not w.restarted
    assert w.seconds == 2.0
    assert w.counters == Counters(600, 480, 600, 480, 2, 0)
    assert w.hit_rate == 480 / 600
    assert w.rate("requests") == 1.0
    assert w.ttft is not None and w.ttft.count == 2


def test_total_hit_rate_sums_deltas_never_averages_ratios() -> None:
    busy = Window(2.0, Counters(prefix_cache_queries=10_000, prefix_cache_hits=0), None)
    tiny = Window(2.0, Counters(prefix_cache_queries=10, prefix_cache_hits=10), None)
    idle = Window(2.0, Counters(), None)
    total = side_by_side([busy, tiny, idle])
    assert total is not None
    assert total.hit_rate == 10 / 10_010  # an average of ratios would say 50%
    assert idle.hit_rate is None  # no lookups: no rate, not 0%
    # a server back from a 60 s outage brings a 60 s window: rates add, each over its own time
    back = Window(60.0, Counters(requests=6), None)
    now = Window(2.0, Counters(requests=4), None)
    both = side_by_side([back, now])
    assert both is not None and both.counters.requests == 10 and both.rate("requests") == 2.1


def test_restart_counts_from_zero_not_a_negative_rate() -> None:
    before = scrape(FakeState(queries=5000, hits=4000, prompt=5000, cached=4000, requests=50,
                              ttfts=[0.2] * 50), 100.0)  # fmt: skip
    after = scrape(FakeState(queries=300, hits=64, prompt=300, cached=64, requests=2, ttfts=[1.2, 0.3],
                             created=FakeState().created + 500), 102.0)  # fmt: skip
    w = window_between(before, after)
    assert w.restarted
    assert w.counters == Counters(300, 64, 300, 64, 2, 0)
    assert w.hit_rate == 64 / 300
    assert w.ttft is not None and w.ttft.count == 2


def test_restart_seen_by_creation_time_even_when_counters_grew_past_the_old_values() -> None:
    before = scrape(FakeState(queries=100, hits=10, prompt=100, cached=10, requests=1), 100.0)
    after = scrape(FakeState(queries=900, hits=500, prompt=900, cached=500, requests=4,
                             created=FakeState().created + 60), 102.0)  # fmt: skip
    w = window_between(before, after)
    assert w.restarted
    assert w.counters.prefix_cache_queries == 900  # not 800: the new process counted all 900


def test_no_restart_when_nothing_changed() -> None:
    a = scrape(FakeState(queries=100, hits=10), 100.0)
    w = window_between(a, scrape(FakeState(queries=100, hits=10), 101.0))
    assert not w.restarted and w.counters == Counters() and w.hit_rate is None


def test_tracking_through_a_restart(fakes: list[FakeVllm]) -> None:
    fake = new_fake(fakes)
    fake.serve(queries=1000, hits=500, prompt=1000, cached=500, requests=4, ttfts=[0.3] * 4)
    track = ServerTrack(Target(fake.url), time.time(), history=10)
    assert track.observe(read(track.target)).window is None  # the baseline
    fake.serve(queries=200, hits=160, prompt=200, cached=160, requests=1, ttfts=[0.2])
    first = track.observe(read(track.target))
    assert first.window is not None and first.window.counters.prefix_cache_queries == 200
    fake.restart()
    fake.serve(queries=64, hits=0, prompt=64, cached=0, requests=1, ttfts=[2.0])
    view = track.observe(read(track.target))
    assert view.state == "restarted" and view.up
    assert view.window is not None and view.window.counters.prefix_cache_queries == 64
    assert view.window.counters.prefix_cache_hits == 0
    assert any("restarted 1x" in n for n in view.notes)
    # since the monitor started: both intervals, across the restart
    assert view.overall is not None
    assert (
        view.overall.counters.prefix_cache_queries == 264 and view.overall.counters.prefix_cache_hits == 160
    )
    fake.serve(queries=100, hits=96, prompt=100, cached=96, requests=1, ttfts=[0.1])
    assert track.observe(read(track.target)).state == "up"


# --- down, not vLLM, prefix caching off, no details ---------------------------------------------


def test_one_dead_server_among_live_ones(fakes: list[FakeVllm]) -> None:
    a, b = new_fake(fakes), new_fake(fakes)
    dead = Target(f"http://127.0.0.1:{dead_port()}")
    targets = [Target(a.url), dead, Target(b.url)]
    tracks = [ServerTrack(t, time.time(), history=10) for t in targets]
    for t in tracks:
        t.observe(read(t.target))
    a.serve(queries=640, hits=512, prompt=640, cached=512, requests=2, ttfts=[0.3, 0.4])
    b.serve(queries=360, hits=0, prompt=360, cached=0, requests=1, ttfts=[3.0])
    views = [t.observe(read(t.target)) for t in tracks]
    assert [v.up for v in views] == [True, False, True]
    assert views[1].state == "down" and views[1].window is None
    assert "unreachable" in views[1].notes[0] and dead.name in views[1].notes[0]
    total = total_view(views, __import__("collections").deque(maxlen=5))
    assert total.state == "2/3 up"
    assert total.window is not None
    assert total.window.counters.prefix_cache_queries == 1000
    assert total.window.hit_rate == 512 / 1000
    assert total.window.ttft is not None and total.window.ttft.count == 3

    # b goes down too; a keeps updating
    b.stop()
    a.serve(queries=100, hits=96, prompt=100, cached=96, requests=1, ttfts=[0.1])
    views = [t.observe(read(t.target)) for t in tracks]
    assert [v.up for v in views] == [True, False, False]
    assert views[0].window is not None and views[0].window.hit_rate == 0.96
    # b comes back (same process): its interval spans the downtime, nothing lost or doubled
    b.serve(queries=50, hits=32, prompt=50, cached=32, requests=1, ttfts=[0.2])
    b.start()
    views = [t.observe(read(t.target)) for t in tracks]
    assert views[2].up and views[2].state == "up"
    assert views[2].window is not None and views[2].window.counters.prefix_cache_queries == 50
    assert views[2].overall is not None and views[2].overall.counters.prefix_cache_queries == 410


def test_prefix_caching_off_says_so_and_names_the_flag(fakes: list[FakeVllm]) -> None:
    fake = new_fake(fakes)
    fake.state.prefix_caching = False
    track = ServerTrack(Target(fake.url), time.time(), history=10)
    track.observe(read(track.target))
    fake.serve(prompt=300, requests=2, ttfts=[1.0, 1.0])  # caching off: no lookups at all
    view = track.observe(read(track.target))
    assert view.prefix_caching is False
    assert hit_cell(view, view.window) == "off"
    assert any(PREFIX_CACHING_OFF in n for n in view.notes)
    assert "--enable-prefix-caching" in PREFIX_CACHING_OFF


def test_check_details_finds_a_server_without_prompt_token_details(fakes: list[FakeVllm]) -> None:
    with_details, without = new_fake(fakes), new_fake(fakes)
    without.state.details = False
    assert check_details(Target(with_details.url), 3.0) is None
    note = check_details(Target(without.url), 3.0)
    assert note == NO_DETAILS and "--enable-prompt-tokens-details" in note
    assert without.completions == 1


def test_cli_check_details_notes_it_in_the_snapshot(fakes: list[FakeVllm], tmp_path: Path) -> None:
    fake = new_fake(fakes)
    fake.state.details = False
    out = tmp_path / "snap.json"
    proc = run_script("-m", "harness.monitor", fake.url, "--once", "--check-details", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    notes = json.loads(out.read_text())["servers"][0]["notes"]
    assert any("--enable-prompt-tokens-details" in n for n in notes)
    assert "--enable-prompt-tokens-details" in proc.stdout


def test_missing_series_are_named() -> None:
    page = "\n".join(
        line for line in metrics_page(FakeState(queries=5)).splitlines() if "time_to_first_token" not in line
    )
    s = scrape_from_text(page, 1.0)
    assert s.missing == ("vllm:time_to_first_token_seconds",) and s.ttft is None


# --- KV-cache events ----------------------------------------------------------------------------


def test_kv_events_count_stored_evicted_and_restored_blocks() -> None:
    """Batches in vLLM 0.32's wire format (KVEventBatch, msgpack: [ts, [event maps], dp_rank]),
    published over a real ZMQ socket, as ``--kv-events-config`` publishes them."""
    import msgspec
    import zmq

    pub: Any = zmq.Context.instance().socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    counter = KvEventCounter(f"tcp://127.0.0.1:{port}")
    encode = msgspec.msgpack.Encoder().encode

    def stored(*hashes: int) -> dict[str, object]:
        return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": None,
                "token_ids": [7] * 32 * len(hashes), "block_size": 32, "lora_id": None,
                "medium": "GPU", "lora_name": None}  # fmt: skip

    def removed(*hashes: int) -> dict[str, object]:
        return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": "GPU"}

    def publish(seq: int, *events: dict[str, object]) -> None:
        pub.send_multipart((b"kv", seq.to_bytes(8, "big"), encode([time.time(), list(events), None])))

    def wait_for(seq: int) -> None:
        for _ in range(200):
            if counter._last_seq == seq:
                return
            time.sleep(0.02)
        raise AssertionError(f"batch {seq} never arrived")

    try:
        for _ in range(200):  # a ZMQ subscriber sees only what is sent after it has joined
            publish(0)
            if counter._last_seq == 0:
                break
            time.sleep(0.05)
        wait_for(0)
        counter.take()
        publish(1, stored(11, 12, 13, 14))  # a new prompt: 4 new blocks
        publish(2, removed(11), removed(12))  # the cache needs room: 2 evicted
        publish(3, stored(11, 12, 21))  # the same prompt again: 2 recomputed after eviction, 1 new
        wait_for(3)
        assert counter.take() == BlockCounts(stored=7, evicted=2, restored=2)
        publish(5, {"type": "AllBlocksCleared"})  # batch 4 lost on the way
        wait_for(5)
        assert counter.take() == BlockCounts(cleared=1, missed_batches=1)
    finally:
        counter.close()
        pub.close(linger=0)


# --- the command line ---------------------------------------------------------------------------


def assert_one_line_error(proc: subprocess.CompletedProcess[str], starts: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(starts), err
    assert proc.stdout == ""  # nothing started


def monitor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_script("-m", "harness.monitor", *args, timeout=120, env=env)


GUARD = "kvtest-proxy-key-31337"


def test_a_proxy_that_guards_metrics_gets_the_key(fakes: list[FakeVllm], tmp_path: Path) -> None:
    fake = new_fake(fakes)
    fake.state.guard = GUARD
    out = tmp_path / "snap.json"
    proc = monitor(fake.url, "--once", "--check-details", "--api-key", GUARD, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert GUARD not in proc.stdout + proc.stderr
    assert GUARD.encode() not in out.read_bytes()
    server = json.loads(out.read_text())["servers"][0]
    assert server["up"] is True and server["notes"] == []  # /metrics read, the probe answered
    assert fake.completions == 1


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "asks for an API key (401 Unauthorized) and none was given"),
        ({"VLLM_API_KEY": "kvtest-wrong"}, "refused the API key from VLLM_API_KEY (401 Unauthorized)"),
    ],
)
def test_a_guarded_metrics_without_the_key_is_one_line(
    fakes: list[FakeVllm], env: dict[str, str], says: str
) -> None:
    fake = new_fake(fakes)
    fake.state.guard = GUARD
    proc = monitor(fake.url, "--interval", "1", env=env)
    assert_one_line_error(proc, f"error: {fake.url} {says}")
    assert "kvtest-wrong" not in proc.stderr


@pytest.mark.parametrize("mode", ["html", "404"])
def test_a_url_that_is_not_vllm_is_an_error(fakes: list[FakeVllm], mode: str) -> None:
    fake = new_fake(fakes)
    fake.state.mode = mode
    proc = monitor(fake.url, "--interval", "1")
    assert_one_line_error(proc, f"error: {fake.url} is not a vLLM server")


@pytest.mark.parametrize(
    ("args", "starts"),
    [
        ((), "error: no server given"),
        (("localhost:8000",), "error: not an http(s) URL: 'localhost:8000'"),
        (("http://",), "error: not an http(s) URL"),
        (("http://h:99999",), "error: bad port"),
        (("http://h:1", "--interval", "0"), "error: --interval must be a positive number"),
        (("http://h:1", "--interval", "-2"), "error: --interval must be a positive number"),
        (("http://h:1", "--interval", "x"), "error: argument --interval: invalid float value"),
        (("http://h:1", "--duration", "0"), "error: --duration must be a positive number"),
        (("http://h:1", "http://h:1/"), "error: http://h:1 is given twice"),
        (("http://h:1", "--json", "/no/such/dir/x.json"), "error: --json /no/such/dir/x.json: folder"),
        (("http://h:1", "--plot", "x.jpg"), "error: --plot x.jpg: the plot is a PNG"),
        (
            ("http://h:1", "http://h:2", "--kv-events", "tcp://h:5557"),
            "error: --kv-events tcp://h:5557: with",
        ),
        (("--bogus",), "error: unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_before_anything_starts(args: tuple[str, ...], starts: str) -> None:
    assert_one_line_error(monitor(*args), starts)


def test_outputs_that_are_not_ours_are_left_alone(fakes: list[FakeVllm], tmp_path: Path) -> None:
    fake = new_fake(fakes)
    precious = tmp_path / "notes.json"
    precious.write_text('{"my": "data"}')
    assert_one_line_error(
        monitor(fake.url, "--once", "--json", str(precious)), f"error: --json {precious} exists"
    )
    assert precious.read_text() == '{"my": "data"}'
    table = tmp_path / "other.csv"
    table.write_text("a,b\n1,2\n")
    assert_one_line_error(
        monitor(fake.url, "--once", "--record", str(table)), f"error: --record {table} exists"
    )
    assert table.read_text() == "a,b\n1,2\n"
    picture = tmp_path / "p.png"
    picture.write_text("not a png")
    assert_one_line_error(monitor(fake.url, "--plot", str(picture)), f"error: --plot {picture} exists")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if not os.access(folder, os.W_OK):  # root can write anywhere: nothing to test then
            assert_one_line_error(monitor(fake.url, "--json", str(folder / "x.json")), "error: --json")
    finally:
        folder.chmod(0o700)


def test_once_snapshot_is_the_counters_since_the_server_started(
    fakes: list[FakeVllm], tmp_path: Path
) -> None:
    a, b = new_fake(fakes), new_fake(fakes)
    a.serve(queries=1000, hits=750, prompt=1000, cached=750, requests=4, ttfts=[0.2, 0.3, 0.3, 2.0])
    b.serve(queries=3000, hits=0, prompt=3000, cached=0, requests=2, ttfts=[4.0, 6.0])
    dead = f"http://127.0.0.1:{dead_port()}"
    out = tmp_path / "snap.json"
    proc = monitor(a.url, "--endpoints", f"{b.url},{dead}", "--once", "--json", str(out))
    assert proc.returncode == 1, proc.stderr  # one server down: the script is told
    snap = json.loads(out.read_text())
    validate("monitor", snap)
    assert snap["window"] == "since each server started"
    sa, sb, sd = snap["servers"]
    assert (sa["url"], sa["up"], sa["prefix_cache_queries"], sa["prefix_cache_hits"]) == (
        a.url,
        True,
        1000,
        750,
    )
    assert sa["hit_rate"] == 0.75 and sa["requests"] == 4
    assert sa["ttft_p50_bucket_s"] == [0.25, 0.5]  # rank 2 of 4: the 0.3 s
    assert sb["hit_rate"] == 0.0 and sb["ttft_p50_bucket_s"] == [2.5, 5.0]
    assert sd["up"] is False and sd["prefix_cache_queries"] is None
    total = snap["total"]
    assert (total["prefix_cache_queries"], total["prefix_cache_hits"]) == (4000, 750)
    assert total["hit_rate"] == 750 / 4000  # not the mean of 75% and 0%
    assert total["requests"] == 6
    assert total["ttft_p90_bucket_s"] == [5.0, 7.5]  # rank 5.4 of 6: the 6.0 s
    # the same file may be rewritten by the monitor (it is ours)
    assert monitor(a.url, "--once", "--json", str(out)).returncode == 0


def test_duration_run_records_each_interval_and_plots(fakes: list[FakeVllm], tmp_path: Path) -> None:
    """Under steady load (each /metrics read adds 100 queries, 40 hits) every interval's row and
    the window's total are exact multiples, whatever the timing."""
    fake = new_fake(fakes)
    fake.state.step = (100, 40)
    csv_path, png, out, svg = tmp_path / "r.csv", tmp_path / "p.png", tmp_path / "w.json", tmp_path / "d.svg"
    args = ["--duration", "2.5", "--interval", "0.5", "--record", str(csv_path), "--plot", str(png)]
    proc = monitor(fake.url, *args, "--json", str(out), "--save-dashboard", str(svg))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) >= 2
    assert all(r["prefix_cache_queries"] == "100" and r["prefix_cache_hits"] == "40" for r in rows)
    assert all(r["hit_rate"] == "0.4" and r["up"] == "1" and r["restarted"] == "0" for r in rows)
    snap = json.loads(out.read_text())
    validate("monitor", snap)
    assert snap["window"] == "since the monitor started"
    assert snap["servers"][0]["prefix_cache_queries"] == 100 * len(rows)
    assert snap["servers"][0]["hit_rate"] == 0.4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Generated with Rich" in svg.read_text()
    # non-terminal output: one plain line per interval, no control codes
    lines = [ln for ln in proc.stdout.splitlines() if " total 1/1 up: hit " in ln]
    assert len(lines) == len(rows)
    assert "\x1b[" not in proc.stdout
    # appending to our own CSV keeps one header
    assert monitor(fake.url, "--once", "--record", str(csv_path)).returncode == 0
    assert csv_path.read_text().count("time,elapsed_s,server") == 1


def test_ctrl_c_ends_cleanly_and_writes_the_snapshot(fakes: list[FakeVllm], tmp_path: Path) -> None:
    fake = new_fake(fakes)
    fake.state.step = (64, 32)
    out = tmp_path / "s.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.monitor", fake.url, "--interval", "0.3", "--json", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # the header line, then two intervals
        assert " total 1/1 up: hit 50.0%" in lines[-1], lines
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    snap = json.loads(out.read_text())
    validate("monitor", snap)
    assert snap["servers"][0]["hit_rate"] == 0.5
    assert (
        snap["servers"][0]["prefix_cache_queries"] % 64 == 0
        and snap["servers"][0]["prefix_cache_queries"] > 0
    )


# --- a real vLLM server -------------------------------------------------------------------------


class LineReader:
    """The monitor's stdout, line by line, without blocking the test forever."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.lines.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 120.0) -> str:
        return self.lines.get(timeout=timeout)

    def drain(self) -> None:
        while not self.lines.empty():
            self.lines.get_nowait()


def settle(target: Target) -> None:
    """Wait until the server's counters stop moving (earlier requests' stats have landed)."""
    previous = None
    for _ in range(50):
        now = read(target).scrape
        assert now is not None
        if previous is not None and now.counters == previous.counters and not now.running:
            return
        previous = now
        time.sleep(0.3)


@pytest.mark.engine
def test_monitor_on_a_real_server_matches_the_requests(vllm_server: ServerProcess, tmp_path: Path) -> None:
    """Requests with known cached tokens: the monitor's hit rate is the counter deltas and the
    per-request cached_tokens sums exactly; its TTFT quantiles hold the client's TTFTs within the
    histogram's bucket bounds."""
    from harness.backend import ServerBackend

    # its warm-up request comes before the baseline
    backend = ServerBackend(vllm_server.url, api_key=vllm_server.credentials)
    target = Target(vllm_server.url)
    settle(target)
    out, csv_path, png = tmp_path / "m.json", tmp_path / "m.csv", tmp_path / "m.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.monitor", vllm_server.url, "--interval", "1", "--check-details",
         "--json", str(out), "--record", str(csv_path), "--plot", str(png)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=key_env(vllm_server),
    )  # fmt: skip
    reader = LineReader(proc)
    try:
        assert "watching 1 server(s)" in reader.next()  # the monitor's baseline is taken
        before = read(target).scrape
        assert before is not None and before.prefix_caching is True

        system_a = "You are a careful assistant for a build system. " * 24
        system_b = "You answer questions about a payroll database, briefly. " * 20
        questions = ["What failed?", "Why did it fail?", "What should I run next?"]
        replies = []
        for system in (system_a, system_b):
            backend.start_variant()  # a fresh cache salt: the first request of each is cold
            for question in questions:
                replies.append(
                    backend.generate(
                        [{"role": "system", "content": system}, {"role": "user", "content": question}]
                    )
                )
        n = len(replies)
        prompt = sum(r.prompt_tokens for r in replies)
        cached = sum(r.cached_tokens for r in replies)
        assert cached > 0 and any(r.cached_tokens == 0 for r in replies)  # both hits and misses

        # the API server updates its counters a moment after the last streamed chunk
        deadline = time.monotonic() + 15
        while True:
            after = read(target).scrape
            assert after is not None
            done = after.counters.requests - before.counters.requests
            if done >= n or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        window = window_between(before, after)
        assert not window.restarted
        assert window.counters.requests == n
        assert window.counters.prefix_cache_hits == cached
        assert window.counters.prefix_cache_queries == prompt
        assert window.counters.cached_prompt_tokens == cached
        assert window.hit_rate == cached / prompt

        # TTFT: the server's clock starts when the request arrives and the client's before it is
        # sent, so each client TTFT is the server's plus a little transport (< SLACK here).
        slack = 0.15
        client = sorted(r.ttft_ms / 1000 for r in replies)
        assert window.ttft is not None and window.ttft.count == n
        for bound, count in zip(window.ttft.bounds, window.ttft.cumulative, strict=True):
            assert sum(t <= bound for t in client) <= count <= sum(t <= bound + slack for t in client), bound
        for q in (0.5, 0.9):
            bq = window.quantile(q)
            assert bq is not None
            kth = client[math.ceil(q * n) - 1]
            assert bq.lower < kth <= bq.upper + slack, (q, bq, client)

        # the CLI saw the same: two intervals printed after now (so the second one read the
        # counters after the last request had landed), then Ctrl-C
        reader.drain()
        reader.next()
        reader.next()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    server = json.loads(out.read_text())["servers"][0]
    assert server["up"] is True
    assert (server["prefix_cache_queries"], server["prefix_cache_hits"]) == (prompt, cached)
    assert server["hit_rate"] == cached / prompt
    assert server["requests"] == n and server["ttft_count"] == n
    assert not any("prompt-tokens-details" in note for note in server["notes"])  # the fixture has it on
    rows = list(csv.DictReader(csv_path.open()))
    assert sum(int(r["prefix_cache_queries"]) for r in rows) == prompt
    assert sum(int(r["prefix_cache_hits"]) for r in rows) == cached
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.engine
def test_check_details_without_the_key_of_a_real_server_is_one_line(vllm_server: ServerProcess) -> None:
    """vLLM's --api-key leaves /metrics open: the monitor alone needs no key, and reads it; the
    probe of --check-details goes to /v1, where the key is checked."""
    assert monitor(vllm_server.url, "--once").returncode == 0
    proc = monitor(vllm_server.url, "--once", "--check-details")
    assert_one_line_error(proc, f"error: {vllm_server.url} asks for an API key (401 Unauthorized)")
