"""Pictures of a run: TTFT per request and cached vs computed tokens per request, per lesson.

Written by ``run_all_examples.py --report DIR`` next to ``summary.json`` and ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
