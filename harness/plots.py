"""Pictures of a run: TTFT per request and cached vs computed tokens per request, per lesson.

Written by ``run_all_examples.py --report DIR`` next to ``summary.json`` and ``report.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.routing_sim import ScalingRow

COLORS = {"wrong": "#c0392b", "right": "#27ae60"}
EXTRA_COLORS = ["#2980b9", "#8e44ad", "#d35400", "#7f8c8d"]


def _color(name: str, index: int) -> str:
    return COLORS.get(name, EXTRA_COLORS[index % len(EXTRA_COLORS)])


def plot_example(example: dict[str, Any], folder: Path) -> list[Path]:
    """Two PNGs for one lesson's JSON result; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    name = example["example"]
    variants = example["variants"]
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, v in enumerate(variants):
        xs = [r["index"] for r in v["requests"]]
        ys = [r["ttft_ms"] / 1000.0 for r in v["requests"]]
        ax.plot(xs, ys, marker="o", color=_color(v["name"], i), label=f"{v['name'].upper()}: {v['label']}")
    ax.set_xlabel("request")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"{name}: TTFT per request")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / f"{name}_ttft.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 4), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants, strict=True):
        xs = [r["index"] for r in v["requests"]]
        cached = [r["cached_tokens"] for r in v["requests"]]
        computed = [r["prompt_tokens"] - r["cached_tokens"] for r in v["requests"]]
        ax.bar(xs, cached, color="#27ae60", label="served from cache")
        ax.bar(xs, computed, bottom=cached, color="#c0392b", label="computed (prefill)")
        ax.set_title(f"{v['name'].upper()}: hit rate {v['summary']['hit_rate']:.0%}", fontsize=9)
        ax.set_xlabel("request")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("prompt tokens")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{name}: cached vs computed tokens per request")
    fig.tight_layout()
    path = folder / f"{name}_tokens.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def plot_scaling(rows: Sequence[ScalingRow], measured: Sequence[ScalingRow], path: Path) -> Path:
    """Lesson 4's scaling study: own-token hit rate, prefill tokens and the busiest worker's
    share against the number of workers, one line per router (all simulated), and the runs on
    real workers as black crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    # (colour, marker, line style, line width): routers that coincide stay visible on top of each other
    styles = {
        "round_robin": (COLORS["wrong"], "o", "-", 2.0),
        "random": ("#d35400", "s", "-", 1.5),
        "session": (COLORS["right"], "o", "-", 4.0),
        "session_bounded": ("#2980b9", "v", "--", 2.0),
        "prefix_aware": ("#8e44ad", "D", ":", 2.0),
    }
    panels = (
        ("own-token hit rate", lambda r: r.own_tokens_hit_rate * 100, "%"),
        ("prefill tokens computed", lambda r: r.prefill_tokens, "tokens"),
        ("busiest worker's share of requests", lambda r: r.max_worker_share * 100, "%"),
    )
    routers = list(dict.fromkeys(r.router for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4.2))
    for ax, (title, value, unit) in zip(axes, panels, strict=True):
        for i, router in enumerate(routers):
            mine = sorted((r for r in rows if r.router == router), key=lambda r: r.workers)
            color, marker, line, width = styles.get(
                router, (EXTRA_COLORS[i % len(EXTRA_COLORS)], "o", "-", 1.5)
            )
            ax.plot(
                [r.workers for r in mine],
                [value(r) for r in mine],
                marker=marker,
                linestyle=line,
                linewidth=width,
                color=color,
                label=router,
            )
        if measured:
            size = measured[0].cache_blocks
            ax.scatter(
                [r.workers for r in measured],
                [value(r) for r in measured],
                marker="x",
                s=80,
                color="black",
                zorder=5,
                label=f"measured on the real workers ({size:,} blocks each)" if size else "measured",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.workers for r in rows}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.set_xlabel("workers (N)")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    blocks = rows[0].cache_blocks if rows else None
    cache = f"worker caches of {blocks} blocks, LRU" if blocks else "unbounded worker caches"
    fig.suptitle(f"session_consistency: lines SIMULATED on N workers ({cache}); x: measured on real workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
