"""What the monitor writes down: the ``--json`` snapshot, the ``--record`` CSV, the ``--plot`` PNG.

The snapshot's schema is docs/schemas/monitor.schema.json. The CSV gets one row per server per
interval (``CSV_COLUMNS``), the plot hit rate and TTFT over time, drawn at exit. Each file is
checked before polling starts (``cli.check_outputs``); ``--save-dashboard`` goes with the
dashboard it saves (``dashboard.save_dashboard``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.metrics import BucketQuantile, Window
from harness.monitor.kv_events import BlockCounts
from harness.monitor.poll import ServerView

JSON_KIND = "kvcache-lessons monitor snapshot"
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
