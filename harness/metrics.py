"""Reading a vLLM server's Prometheus ``/metrics``: samples, counters, histograms, and the
arithmetic that turns two readings into honest numbers for the time between them.

**Counters, not ratios.** vLLM exports running totals (``vllm:prefix_cache_queries_total``: prompt
tokens looked up in the prefix cache; ``vllm:prefix_cache_hits_total``: those served from it).
The hit rate of a window is the increase of one over the increase of the other::

    hit_rate = (hits_now - hits_then) / (queries_now - queries_then)

It is weighted by tokens, the unit that costs prefill time. Averaging per-request or per-server
ratios instead would give a 10-token request the same say as a 10,000-token one, and an idle
server the same say as a busy one; summing the deltas first and dividing once gives neither.

**Resets.** A counter only goes up while its process lives; a restarted server starts again at
zero. A reading is "after a restart" when any counter went down or when the creation time
vLLM's Prometheus client publishes next to each counter (``..._created``) changed. The increase
over such a window is then the new value itself (everything counted since the restart), as
Prometheus's ``rate()`` does, never a negative number. What was counted between the last reading
before the restart and the crash is lost: at most one polling interval.

**Histograms give bucket-resolution quantiles.** vLLM does not export individual TTFTs, only a
cumulative histogram (``..._bucket{le="0.25"}``: how many were at most 0.25 s). The increase of
each bucket over a window is the histogram of that window alone. A quantile is then known only
to lie inside one bucket ``(lower, upper]``; :func:`bucket_quantile` returns that bucket and, as
Prometheus's ``histogram_quantile`` does, an estimate interpolated linearly inside it. With
vLLM's default TTFT buckets (..., 0.25, 0.5, 0.75, 1, 2.5, 5, ...) a p50 of "0.38 s" means
"somewhere in (0.25, 0.5]".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    """One line of the Prometheus text format: ``name{labels} value``."""

    name: str
    labels: Labels
    value: float

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


_ESCAPES = {"n": "\n", "\\": "\\", '"': '"'}


def _parse_labels(text: str, start: int) -> tuple[Labels, int]:
    """Parse ``{a="x",b="y"}`` starting at the ``{``; return the labels and the index after ``}``.

    Label values may hold commas, braces and escaped quotes (vLLM's ``cache_config_info``
    does), so this walks the characters instead of splitting on commas."""
    labels: list[tuple[str, str]] = []
    i = start + 1
    while True:
        while i < len(text) and text[i] in " ,":
            i += 1
        if i >= len(text):
            raise ValueError("unterminated label set")
        if text[i] == "}":
            return tuple(labels), i + 1
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = eq + 1
        if i >= len(text) or text[i] != '"':
            raise ValueError("label value is not quoted")
        i += 1
        value: list[str] = []
        while True:
            ch = text[i]
            if ch == "\\":
                value.append(_ESCAPES.get(text[i + 1], text[i + 1]))
                i += 2
            elif ch == '"':
                i += 1
                break
            else:
                value.append(ch)
                i += 1
        labels.append((key, "".join(value)))


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a ``/metrics`` page; comments and malformed lines are skipped."""
    samples: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                name = line[:brace]
                labels, end = _parse_labels(line, brace)
                rest = line[end:].split()
            else:
                name, *rest = line.split()
                labels = ()
            # An optional timestamp may follow the value; the value comes first.
            samples.append(Sample(name, labels, float(rest[0])))
        except (ValueError, IndexError):
            continue
    return samples


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum each metric over its label sets (one server, possibly several engines)."""
    totals: dict[str, float] = {}
    for sample in parse_samples(text):
        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def metric_label(text: str, metric: str, label: str) -> str | None:
    """The value of ``label`` on the first sample of ``metric`` (for the *_info gauges)."""
    for sample in parse_samples(text):
        if sample.name == metric:
            return sample.label(label)
    return None


# --------------------------------------------------------------------------------------------
# Histograms and their quantiles


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram summed over label sets: cumulative counts per upper bound."""

    bounds: tuple[float, ...]  # ascending upper bounds ``le``, the last one +inf
    cumulative: tuple[float, ...]  # observations <= each bound
    count: float
    total: float  # the ``_sum``: total of all observations

    def __sub__(self, older: Histogram) -> Histogram:
        """The histogram of what was observed after ``older`` (same bucket bounds)."""
        if self.bounds != older.bounds:
            raise ValueError("histograms with different bucket bounds")
        return Histogram(
            self.bounds,
            tuple(a - b for a, b in zip(self.cumulative, older.cumulative, strict=True)),
            self.count - older.count,
            self.total - older.total,
        )

    def __add__(self, other: Histogram) -> Histogram:
        if self.bounds != other.bounds:
            raise ValueError("histograms with different bucket bounds")
        return Histogram(
            self.bounds,
            tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True)),
            self.count + other.count,
            self.total + other.total,
        )


def histogram_of(samples: Iterable[Sample], name: str) -> Histogram | None:
    """The histogram ``name`` (its ``_bucket``, ``_count`` and ``_sum`` series), summed over its
    label sets, or None when the page has no such histogram."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for s in samples:
        if s.name == name + "_bucket":
            le = s.label("le")
            if le is None:
                continue
            bound = float(le)  # "+Inf" parses as inf
            buckets[bound] = buckets.get(bound, 0.0) + s.value
        elif s.name == name + "_count":
            count += s.value
        elif s.name == name + "_sum":
            total += s.value
    if not buckets:
        return None
    bounds = tuple(sorted(buckets))
    return Histogram(bounds, tuple(buckets[b] for b in bounds), count, total)


@dataclass(frozen=True)
class BucketQuantile:
    """A quantile known to bucket resolution: it lies in ``(lower, upper]``."""

    q: float
    estimate: float  # linear interpolation inside the bucket (Prometheus' histogram_quantile)
    lower: float
    upper: float  # inf when the rank falls in the overflow bucket (above the last bound)

    def contains(self, value: float) -> bool:
        return self.lower < value <= self.upper


def bucket_quantile(hist: Histogram, q: float) -> BucketQuantile | None:
    """The ``q``-quantile of ``hist``'s observations, or None when there are none.

    The rank ``q * count`` falls in the first bucket whose cumulative count reaches it; the
    quantile is inside that bucket. The first bucket's lower edge is 0 (latencies are not
    negative); in the overflow bucket the estimate is the last finite bound, as in Prometheus.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    n = hist.cumulative[-1] if hist.cumulative else 0.0
    if n <= 0:
        return None
    rank = q * n
    previous_bound, previous_count = 0.0, 0.0
    for bound, cumulative in zip(hist.bounds, hist.cumulative, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return BucketQuantile(q, previous_bound, previous_bound, bound)
            inside = (rank - previous_count) / (cumulative - previous_count)
            return BucketQuantile(
                q, previous_bound + (bound - previous_bound) * inside, previous_bound, bound
            )
        previous_bound, previous_count = bound, cumulative
    return None  # pragma: no cover - the +Inf bucket always holds every observation


# --------------------------------------------------------------------------------------------
# One reading of a vLLM server, and the window between two readings

# The vLLM (V1, 0.32) series this module reads, in one place.
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"  # prompt tokens looked up in the prefix cache
PREFIX_HITS = "vllm:prefix_cache_hits_total"  # ... of which served from it
PROMPT_TOKENS = "vllm:prompt_tokens_total"  # prompt tokens of prefills done
PROMPT_TOKENS_CACHED = "vllm:prompt_tokens_cached_total"  # ... of which not computed (cache)
REQUESTS = "vllm:request_success_total"  # finished requests, labelled by finished_reason
PREEMPTIONS = "vllm:num_preemptions_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"  # 0..1 despite the name
TTFT = "vllm:time_to_first_token_seconds"  # histogram
CACHE_CONFIG = "vllm:cache_config_info"  # a gauge set to 1 whose labels are the cache config
# Creation times published next to counters: a new value means a new process.
IDENTITY_SERIES = ("vllm:prompt_tokens_created", "vllm:prefix_cache_queries_created")


@dataclass(frozen=True)
class Counters:
    """The cumulative counters the monitor follows (or their increase over a window)."""

    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    prompt_tokens: float = 0.0
    cached_prompt_tokens: float = 0.0
    requests: float = 0.0
    preemptions: float = 0.0

    def __sub__(self, older: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) - getattr(older, f.name) for f in fields(self)))

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def went_down_from(self, older: Counters) -> bool:
        return any(getattr(self, f.name) < getattr(older, f.name) for f in fields(self))


@dataclass(frozen=True)
class Scrape:
    """One reading of one server's ``/metrics``, reduced to what the monitor needs."""

    wall: float  # time.time() when read
    counters: Counters
    running: float | None
    waiting: float | None
    kv_usage: float | None
    ttft: Histogram | None
    prefix_caching: bool | None  # cache_config_info's enable_prefix_caching, when published
    kv_blocks: int | None  # cache_config_info's num_gpu_blocks: weights KV usage in a total
    identity: tuple[tuple[tuple[str, Labels], float], ...]  # ((name, labels), _created) of IDENTITY_SERIES
    missing: tuple[str, ...]  # series this page lacks (their counters read as 0)

    @property
    def started_at(self) -> float | None:
        """When the server's counters were created (its start), from the ``_created`` series."""
        return min((t for _, t in self.identity), default=None)


class NotVllm(ValueError):
    """The page is not a vLLM server's ``/metrics``."""


def scrape_from_text(text: str, wall: float) -> Scrape:
    samples = parse_samples(text)
    if not any(s.name.startswith("vllm:") for s in samples):
        raise NotVllm("no vllm: metrics")
    totals: dict[str, float] = {}
    for s in samples:
        totals[s.name] = totals.get(s.name, 0.0) + s.value
    missing = [name for name in (PREFIX_QUERIES, PREFIX_HITS, PROMPT_TOKENS, REQUESTS) if name not in totals]
    cached = totals.get(PROMPT_TOKENS_CACHED)
    if cached is None:
        # Older servers lack it; the prefix-cache hits count the same tokens (local cache only).
        cached = totals.get(PREFIX_HITS, 0.0)
    counters = Counters(
        prefix_cache_queries=totals.get(PREFIX_QUERIES, 0.0),
        prefix_cache_hits=totals.get(PREFIX_HITS, 0.0),
        prompt_tokens=totals.get(PROMPT_TOKENS, 0.0),
        cached_prompt_tokens=cached,
        requests=totals.get(REQUESTS, 0.0),
        preemptions=totals.get(PREEMPTIONS, 0.0),
    )
    ttft = histogram_of(samples, TTFT)
    if ttft is None:
        missing.append(TTFT)
    caching: bool | None = None
    blocks: int | None = None
    for s in samples:
        if s.name == CACHE_CONFIG:
            flag = s.label("enable_prefix_caching")
            caching = None if flag is None else flag == "True"
            found = s.label("num_gpu_blocks")
            blocks = int(found) if found and found.isdigit() else None
            break
    identity = tuple(sorted(((s.name, s.labels), s.value) for s in samples if s.name in IDENTITY_SERIES))
    return Scrape(
        wall=wall,
        counters=counters,
        running=totals.get(RUNNING),
        waiting=totals.get(WAITING),
        kv_usage=totals.get(KV_USAGE),
        ttft=ttft,
        prefix_caching=caching,
        kv_blocks=blocks,
        identity=identity,
        missing=tuple(missing),
    )


def restarted_between(older: Scrape, newer: Scrape) -> bool:
    """Did the server restart between two readings? Its counters went down, or a counter's
    creation time changed (caught even when the new process has already counted past the old
    values, which the first test alone would miss)."""
    if newer.counters.went_down_from(older.counters):
        return True
    if older.ttft is not None and newer.ttft is not None and newer.ttft.count < older.ttft.count:
        return True
    # Compared series by series: a label set that is new (an engine added) is not a restart.
    before = dict(older.identity)
    return any(key in before and before[key] != created for key, created in newer.identity)


@dataclass(frozen=True)
class Window:
    """What a server did between two readings: counter increases and the TTFT histogram."""

    seconds: float
    counters: Counters
    ttft: Histogram | None
    restarted: bool = False  # the window starts at a server restart (counters from zero)
    # For several servers side by side: their own windows, whose rates add up (each over its
    # own duration: a server back from an outage brings a longer window than the others).
    parts: tuple[Window, ...] = ()

    @property
    def hit_rate(self) -> float | None:
        """Token-weighted prefix-cache hit rate; None when no prompt token was looked up."""
        q = self.counters.prefix_cache_queries
        return self.counters.prefix_cache_hits / q if q > 0 else None

    def rate(self, counter: str) -> float | None:
        """Per second, for a ``Counters`` field name (e.g. ``"requests"``)."""
        if self.parts:
            rates = [r for r in (p.rate(counter) for p in self.parts) if r is not None]
            return sum(rates) if rates else None
        return getattr(self.counters, counter) / self.seconds if self.seconds > 0 else None

    def quantile(self, q: float) -> BucketQuantile | None:
        return bucket_quantile(self.ttft, q) if self.ttft is not None else None


def window_between(older: Scrape | None, newer: Scrape) -> Window:
    """The window from ``older`` to ``newer``; from the server's start when ``older`` is None
    (or when the server restarted in between: its counters began again at zero)."""
    if older is None:
        since = newer.started_at  # the server's clock: exact on this machine, skewed if remote
        seconds = max(0.0, newer.wall - since) if since is not None else 0.0
        return Window(seconds, newer.counters, newer.ttft, False)
    if restarted_between(older, newer):
        # Everything the new process counted happened after the older reading.
        return Window(newer.wall - older.wall, newer.counters, newer.ttft, True)
    ttft: Histogram | None = None
    if newer.ttft is not None and older.ttft is not None and newer.ttft.bounds == older.ttft.bounds:
        ttft = newer.ttft - older.ttft
    return Window(newer.wall - older.wall, newer.counters - older.counters, ttft, False)


def _add_histograms(parts: Sequence[Histogram | None]) -> Histogram | None:
    present = [h for h in parts if h is not None]
    if not present or any(h.bounds != present[0].bounds for h in present):
        return None  # none, or bucket bounds that cannot be added (custom buckets per server)
    total = present[0]
    for h in present[1:]:
        total = total + h
    return total


def then(first: Window, second: Window) -> Window:
    """Two consecutive windows of one server as one (the monitor's since-start figures)."""
    ttft = _add_histograms([first.ttft, second.ttft])
    return Window(first.seconds + second.seconds, first.counters + second.counters, ttft, first.restarted)


def side_by_side(windows: Sequence[Window]) -> Window | None:
    """Several servers over the same stretch of time as one: counters summed first, so the hit
    rate of the whole is token-weighted, never an average of the servers' rates."""
    if not windows:
        return None
    counters = Counters()
    for w in windows:
        counters = counters + w.counters
    seconds = max(w.seconds for w in windows)
    restarted = any(w.restarted for w in windows)
    ttft = _add_histograms([w.ttft for w in windows])
    return Window(seconds, counters, ttft, restarted, parts=tuple(windows))


def combined_kv_usage(parts: Sequence[tuple[float | None, int | None]]) -> float | None:
    """KV-cache usage of several servers: used blocks over all blocks when the block counts are
    known (a big server counts more), else the mean."""
    known = [(u, b) for u, b in parts if u is not None]
    if not known:
        return None
    if all(b for _, b in known):
        return sum(u * (b or 0) for u, b in known) / sum(b or 0 for _, b in known)
    return sum(u for u, _ in known) / len(known)
