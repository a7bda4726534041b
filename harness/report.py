"""Show results: rich tables for people, the JSON contract (docs/schemas/lesson.schema.json) for machines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from harness import outputs
from harness.backend import EngineInfo
from harness.console import console, mark
from harness.measure import RequestRecord, VariantResult, compare
from harness.prefix import Divergence

# Automatic caching with no code change, like vLLM's APC, and exact offline token counts.
DEFAULT_PRICE_AS = "openai:gpt-6.2-sol"
RUNS = 1000  # the summary prices this many runs of a lesson's session: cents become readable


def prompt_cost_usd(variant: VariantResult, provider_model: str) -> float | None:
    """A variant's prompt tokens at ``provider_model``'s list prices: the tokens the engine served
    from cache at the cached-input rate, the rest at the input rate (cache-write surcharges and
    output not counted). ``None`` when the table has no such prices."""
    from harness.providers import load_table, price

    summary = variant.summary()
    cost = price(
        provider_model,
        load_table(),
        prompt_tokens=summary["prompt_tokens"],
        cached_tokens=summary["cached_tokens"],
    )
    return None if cost is None else round(cost, 8)


@dataclass
class ExampleResult:
    """One lesson's run: what the JSON contract calls an example. A lesson with findings of its own
    subclasses it with typed fields and adds them in ``to_json`` (lessons 2-5)."""

    example: str
    engine: EngineInfo
    variants: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    price_as: str = DEFAULT_PRICE_AS  # the provider:model whose list prices the summary quotes

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def comparison(self) -> dict[str, Any]:
        out = compare(self.variant("wrong"), self.variant("right"))
        out.update(
            cost_wrong_usd=prompt_cost_usd(self.variant("wrong"), self.price_as),
            cost_right_usd=prompt_cost_usd(self.variant("right"), self.price_as),
            cost_provider=self.price_as,
        )
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "example": self.example,
            "engine": self.engine.to_json(),
            "variants": [v.to_json() for v in self.variants],
            "comparison": self.comparison(),
        }
        if self.notes:
            out["notes"] = self.notes
        return out


def variant_table(variant: VariantResult, extra_columns: tuple[str, ...] = ()) -> Table:
    table = Table(title=f"{variant.name.upper()}: {escape(variant.label)}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("prompt tok", justify="right")
    table.add_column("cached (engine)", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("match", justify="center")
    table.add_column("hit", justify="right")
    table.add_column("TTFT ms", justify="right")
    table.add_column("leaves cache at", justify="right")
    for name in extra_columns:
        table.add_column(name, justify="right")
    for r in variant.requests:
        hit = r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0.0
        leaves = "-" if r.first_divergence >= r.prompt_tokens else str(r.first_divergence)
        row = [
            str(r.index),
            f"{r.prompt_tokens:,}",
            f"{r.cached_tokens:,}",
            f"{r.predicted_cached_tokens:,}",
            mark(r.prediction_ok),
            f"{hit:.0%}",
            f"{r.ttft_ms:,.0f}",
            leaves,
        ]
        row += [str(r.extra.get(name, "")) for name in extra_columns]
        table.add_row(*row)
    return table


def divergence_panel(record: RequestRecord, title: str) -> Panel:
    """The exact token where a prompt left the cache, with the text on both sides."""
    d: Divergence | None = record.divergence
    if d is None:
        return Panel("nothing was cached yet", title=title)
    body = (
        f"token index [bold]{d.index}[/] of {record.prompt_tokens:,}; "
        f"{record.cached_tokens:,} tokens served from cache\n\n"
        f"[dim]...{escape(d.before)}[/]"
        f"[bold red on white]«{escape(d.token)}»[/]"
        f"[dim]{escape(d.after)}...[/]\n\n"
    )
    if d.previous_token:
        body += (
            f"the cached prompt had [bold]{escape(repr(d.previous_token))}[/] where this one has "
            f"[bold]{escape(repr(d.token))}[/]"
        )
    else:
        body += "the cached prompt ended here: everything from this token on is new"
    return Panel(body, title=title, title_align="left")


def summary_panel(result: ExampleResult) -> Panel:
    c = result.comparison()
    e = result.engine
    lines = [
        f"hit rate    WRONG [red]{c['hit_rate_wrong']:.1%}[/]   RIGHT [green]{c['hit_rate_right']:.1%}[/]",
        f"TTFT median WRONG {result.variant('wrong').summary()['ttft_ms_median']:,.0f} ms   "
        f"RIGHT {result.variant('right').summary()['ttft_ms_median']:,.0f} ms   "
        f"speedup [bold]{c['ttft_speedup_median']:.1f}x[/]",
        f"prediction == engine on every request: {mark(c['prediction_matches'])}",
    ]
    for v in result.variants:
        agree = v.counters_agree()
        if agree is not None:
            lines.append(f"engine counters agree with per-request numbers ({v.name}): {mark(agree)}")
    if c["cost_wrong_usd"] is not None and c["cost_right_usd"] is not None:
        lines.append(
            f"prompt cost per {RUNS:,} runs of this session at {c['cost_provider']} list prices: "
            f"WRONG [red]${c['cost_wrong_usd'] * RUNS:,.2f}[/]   "
            f"RIGHT [green]${c['cost_right_usd'] * RUNS:,.2f}[/]"
            "   [dim](engine's cached tokens at the cached-input rate; writes, output not counted)[/]"
        )
    lines.append(
        f"[dim]{e.backend} {e.vllm_version} | model {escape(e.model)} | device {e.device} | "
        f"block size {e.block_size}[/]"
    )
    lines += [f"[dim]{escape(n)}[/]" for n in result.notes]
    return Panel("\n".join(lines), title=f"{result.example}: summary", title_align="left")


def show(result: ExampleResult, extra_columns: tuple[str, ...] = ()) -> None:
    for v in result.variants:
        console.print(variant_table(v, extra_columns))
    console.print(summary_panel(result))


def is_lesson_result(document: Any) -> bool:
    """A lesson's or the runner's ``--json`` output (what ``--json`` may replace)."""
    return isinstance(document, dict) and ("example" in document or "examples" in document)


def check_json_target(path: str | None) -> Path | None:
    """Fail before any work if ``--json PATH`` cannot be written, or would overwrite something
    that is not an earlier result of these lessons."""
    return outputs.check_json_target("--json", path, is_lesson_result, "a result file of these lessons")


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    outputs.write_json(path, payload)
    console.print(f"[dim]wrote {path}[/]")
