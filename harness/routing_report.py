"""Lesson 4's results: typed from the run to the JSON, and the tables that show them.

A plan (``RunPlan``: which router, crash a worker or not) runs on the workers and becomes a
``PlanRun``: the engines' records, the simulation's expectation of them, each worker's counters
and, after a crash, the ``fleet.FailoverReport``. ``Scaling`` holds the same sessions replayed on
more (simulated) workers, and for the N that ran for real a ``RealRunCheck``: the measured row
next to its replay. Nothing becomes a dict before ``to_json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from harness.console import console, mark
from harness.fleet import Dispatched, FailoverReport, vllm_router_policy
from harness.measure import VariantResult
from harness.routing import (
    DEFAULT_BALANCE_FACTOR,
    any_seen_fraction,
    load_cap,
    session_number,
    sticky_fraction,
)
from harness.routing_sim import (
    SCALING_ROUTERS,
    Expected,
    ScalingRow,
    Workload,
    run_salts,
    scaling_row,
    simulated_row,
)


@dataclass(frozen=True)
class RunPlan:
    """One router run of the lesson."""

    name: str  # the variant name in the JSON: wrong / right / random / failover
    policy: str  # harness.routing's router: round_robin | random | session
    how: str  # what the router does, when the script routes
    kill_at: int | None = None  # crash a worker with this request in flight

    def label(self, routed_by: str) -> str:
        how = self.how
        if routed_by == "vllm-router":
            how = f"vllm-router --policy {vllm_router_policy(self.policy)}"
            how += " on the X-Session-ID header" if self.policy == "session" else ""
        return how if self.kill_at is None else f"{how}; a worker crashes after {self.kill_at} requests"

    def router(self, routed_by: str) -> str:
        """The router as the JSON names it."""
        return self.policy if routed_by == "script" else f"vllm-router:{vllm_router_policy(self.policy)}"


@dataclass
class PlanRun:
    """One plan, run on the workers, next to what the simulation expected of it."""

    plan: RunPlan
    router: str
    salt: str
    expected: Expected
    sent: Dispatched
    variant: VariantResult
    own_tokens_hit_rate: float
    failover: FailoverReport | None

    def assignments(self) -> list[tuple[str, str]]:
        return [(r.extra["session"], r.extra["worker"]) for r in self.variant.requests]

    @property
    def sticky_fraction(self) -> float:
        return sticky_fraction(self.assignments())

    @property
    def expected_matches_measured(self) -> bool:
        return self.expected.cached == [r.cached_tokens for r in self.variant.requests]

    def session_map(self) -> dict[str, list[str]]:
        """For each session, the worker of each of its turns (a retried turn: 'dead->new')."""
        out: dict[str, list[str]] = {}
        ordered = sorted(
            self.variant.requests, key=lambda r: (session_number(r.extra["session"]), r.extra["turn"])
        )
        for r in ordered:
            where = r.extra["worker"]
            if "retried_from" in r.extra:
                where = f"{r.extra['retried_from']}->{where}"
            out.setdefault(r.extra["session"], []).append(where)
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "router": self.router,
            "cache_salt": self.salt,
            "expected_hit_rate": round(self.expected.hit_rate, 4),
            "own_tokens_hit_rate": round(self.own_tokens_hit_rate, 4),
            "expected_matches_measured": self.expected_matches_measured,
            "sticky_fraction": round(self.sticky_fraction, 4),
            "any_seen_fraction": round(any_seen_fraction(self.assignments()), 4),
            "wall_s": round(self.sent.wall_s, 3),
            "per_worker": {t.name: t.to_json() for t in self.sent.tallies},
            "session_to_worker": self.session_map(),
        }
        if self.failover is not None:
            out["failover"] = self.failover.to_json()
        return out


@dataclass(frozen=True)
class RealRunCheck:
    """The N that ran for real: what the engines measured vs the same replay as the simulated
    rows, with caches as large as the real workers'."""

    measured: ScalingRow
    replayed: ScalingRow

    @property
    def equal(self) -> bool:
        return self.measured.same_figures(self.replayed)


@dataclass(frozen=True)
class Scaling:
    """The run's sessions on more workers: the simulated rows, and the real N checked."""

    sessions: int
    worker_counts: tuple[int, ...]
    block_size: int
    cache_blocks: int | None  # each simulated worker's (None: unbounded)
    rows: list[ScalingRow]
    checks: list[RealRunCheck]

    def to_json(self) -> list[dict[str, Any]]:
        out = [row.to_json() for row in self.rows]
        for check in self.checks:
            out.append(check.replayed.to_json())
            out.append({**check.measured.to_json(), "equals_simulation": check.equal})
        return out


def real_run_checks(
    runs: Sequence[PlanRun],
    workload: Workload,
    workers: int,
    block_size: int,
    real_cache_blocks: int | None,
    seed: int,
    salt_per_session: bool,
) -> list[RealRunCheck]:
    """Each plain run (no crash) as a scaling row, next to its replay with caches the size of the
    real workers' (``real_cache_blocks``: vLLM's ``num_gpu_blocks``, one of them its null block).
    Only runs this program routed: vllm-router's ring is its own, not one the simulation has."""
    usable = real_cache_blocks - 1 if real_cache_blocks else None
    checks = []
    for run in runs:
        if run.plan.kill_at is not None or run.router != run.plan.policy:
            continue
        records = run.variant.requests
        measured = scaling_row(
            workload,
            block_size,
            run.router,
            workers,
            [r.extra["worker"] for r in records],
            [r.prompt_tokens for r in records],
            [r.cached_tokens for r in records],
            simulated=False,
            cache_blocks=usable,
            evicted_blocks=None,
        )
        salts = run_salts(workload.arrivals, run.salt, salt_per_session)
        replayed = simulated_row(workload, salts, block_size, seed, run.plan.policy, workers, usable)
        checks.append(RealRunCheck(measured, replayed))
    return checks


# --- tables ------------------------------------------------------------------------------------


def routers_table(runs: Sequence[PlanRun]) -> Table:
    table = Table(title="Routers: measured on the engines vs expected before sending", title_justify="left")
    columns = (
        "variant",
        "router",
        "hit",
        "expected",
        "own-token hit",
        "sticky",
        "TTFT p50 ms",
        "TTFT p90 ms",
    )
    for name in (*columns, "load", "exact"):
        table.add_column(name, justify="left" if name in ("variant", "router", "load") else "right")
    for run in runs:
        s = run.variant.summary()
        load = " ".join(f"{t.name.replace('worker-', 'w')}:{t.requests}" for t in run.sent.tallies)
        counters = all(t.counters_agree for t in run.sent.tallies)
        table.add_row(
            run.plan.name.upper(),
            run.router,
            f"{s['hit_rate']:.1%}",
            f"{round(run.expected.hit_rate, 4):.1%}",
            f"{round(run.own_tokens_hit_rate, 4):.1%}",
            f"{round(run.sticky_fraction, 4):.0%}",
            f"{s['ttft_ms_median']:,.0f}",
            f"{s['ttft_ms_p90']:,.0f}",
            load,
            mark(counters and s["prediction_matches"]),
        )
    return table


ROUTERS_LEGEND = (
    "hit: cached / prompt tokens, engine truth.  expected: the same arrivals routed by a fresh router "
    "and replayed through one cache model per worker, before any request was sent.  own-token hit: "
    "the hit rate past the prefix all sessions share (with one cache_salt per run every worker caches "
    "that prefix, whatever the router; routing decides the rest).  sticky: follow-up turns sent "
    "where the previous turn went.  exact: predicted == engine on every request and each "
    "worker's /metrics counters == the sums of its requests."
)


def session_table(runs: Sequence[PlanRun]) -> Table:
    table = Table(title="Where each session's turns went (worker per turn)", title_justify="left")
    table.add_column("session")
    maps = [run.session_map() for run in runs]
    for run in runs:
        table.add_column(run.plan.name.upper())
    for s in sorted(maps[0], key=session_number):
        cells = []
        for by_session in maps:
            turns = by_session.get(s, [])
            text = " ".join(t.replace("worker-", "w") for t in turns)
            cells.append(f"[green]{text}[/]" if len(set(turns)) == 1 else escape(text))
        table.add_row(s, *cells)
    return table


def counters_table(runs: Sequence[PlanRun]) -> Table:
    table = Table(
        title="Per worker: per-request sums vs the worker's own /metrics counters (delta over the run)",
        title_justify="left",
    )
    columns = ("variant", "worker", "requests", "prompt tok", "cached (requests)", "queries (/metrics)")
    for name in (*columns, "hits (/metrics)", "hit rate", "agree"):
        table.add_column(name, justify="left" if name in ("variant", "worker") else "right")
    for run in runs:
        for t in run.sent.tallies:
            table.add_row(
                run.plan.name.upper(),
                t.name + (" (crashed)" if t.crashed else ""),
                str(t.requests),
                f"{t.prompt_tokens:,}",
                f"{t.cached_tokens:,}",
                f"{t.counters.queries:,}",
                f"{t.counters.hits:,}",
                f"{round(t.hit_rate, 4):.0%}",
                mark(t.counters_agree),
            )
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def failover_panel(report: FailoverReport) -> Panel:
    f = report.failover
    moved = ", ".join(f"{s} -> {to}" for s, to in report.moved_sessions.items()) or "none"
    lines = [
        f"{f.victim} crashed (SIGKILL) after {f.after_requests} requests, with request "
        f"{f.after_requests} in flight.",
        f"failed on it and retried on another worker: requests {f.retried}; "
        f"queued for it and sent to their next worker instead: {f.moved or 'none'}",
        f"sessions moved: {moved}",
        f"  each to its next worker on the ring: {mark(report.moved_to_next_on_ring)}   "
        f"every other session kept its worker: {mark(report.other_sessions_kept_their_worker)}",
        f"requests answered: {report.requests_answered} of {report.requests}",
        f"hit rate: before the crash {_pct(report.hit_rate_before)}  |  moved sessions, first turn "
        f"after the move {_pct(report.hit_rate_moved_first_turn)} (the dip: only the system prompt is "
        f"cached there)  ->  their later turns {_pct(report.hit_rate_moved_later_turns)} (recovered)  |  "
        f"unmoved sessions {_pct(report.hit_rate_unmoved_after)}",
    ]
    return Panel("\n".join(lines), title="Failover: a worker dies mid-run", title_align="left")


SCALING_FIGURES: tuple[tuple[str, Callable[[ScalingRow], str]], ...] = (
    ("own-token hit rate", lambda r: f"{r.own_tokens_hit_rate:.1%}"),
    ("prefill tokens computed", lambda r: f"{r.prefill_tokens:,}"),
    ("busiest worker's share of the requests", lambda r: f"{r.max_worker_share:.0%}"),
    ("KV blocks evicted", lambda r: f"{r.evicted_blocks or 0:,}"),
)

SCALING_LEGEND = (
    "Every figure in these tables is SIMULATED: the sessions' real token IDs, routed by each router and "
    "replayed through a model of each worker's KV cache (harness/block_pool.py).  prefill: prompt tokens "
    "computed rather than read from a cache.  busiest share: 1/N is even; a router that keeps sessions "
    "together cannot go below one session's share.  session_bounded: the ring, but no worker over "
    f"ceil({DEFAULT_BALANCE_FACTOR} x sessions / N) sessions (the load-bound row: few sessions round up, "
    "and may allow what the ring did anyway).  prefix_aware: the worker caching the longest prefix "
    "of the prompt, within the same bound."
)


def scaling_tables(scaling: Scaling) -> list[Table]:
    """One table per figure: routers down, worker counts across, every cell simulated."""
    cache = "unbounded caches"
    if scaling.cache_blocks:
        cache = f"{scaling.cache_blocks * scaling.block_size:,}-token LRU cache each"
    tables = []
    for title, cell in SCALING_FIGURES:
        table = Table(
            title=f"SIMULATED {title} ({scaling.sessions} sessions on N workers, {cache})",
            title_justify="left",
        )
        table.add_column("router")
        for n in scaling.worker_counts:
            table.add_column(f"N={n}", justify="right")
        for router in SCALING_ROUTERS:
            by_n = {r.workers: r for r in scaling.rows if r.router == router}
            table.add_row(router, *(cell(by_n[n]) for n in scaling.worker_counts))
        if title.startswith("busiest"):  # what the two bounded routers allow: a few sessions round up
            caps = [
                load_cap(DEFAULT_BALANCE_FACTOR, scaling.sessions, n) / scaling.sessions
                for n in scaling.worker_counts
            ]
            table.add_row("[dim]load bound (last two)[/]", *(f"[dim]{cap:.0%}[/]" for cap in caps))
        tables.append(table)
    return tables


def real_run_lines(scaling: Scaling) -> list[str]:
    """The N that ran for real, measured vs replayed: what makes the simulated rows credible."""
    if not scaling.checks:
        return [
            "[dim]no real run is checked against the simulation: vllm-router routed them, with a ring "
            "of its own[/]"
        ]
    first = scaling.checks[0].replayed
    size = (
        f"caches of {first.cache_blocks:,} blocks, as the real workers'"
        if first.cache_blocks
        else "unbounded caches"
    )
    lines = [f"N={first.workers} ran for real; replayed like the simulated rows, with {size}:"]
    for check in scaling.checks:
        m, r = check.measured, check.replayed
        lines.append(
            f"  {m.router:<12} measured:  own-token {m.own_tokens_hit_rate:.1%}, hit {m.hit_rate:.1%}, "
            f"prefill {m.prefill_tokens:,}, busiest {m.max_worker_share:.0%}"
        )
        lines.append(
            f"  {'':<12} simulated: own-token {r.own_tokens_hit_rate:.1%}, hit {r.hit_rate:.1%}, "
            f"prefill {r.prefill_tokens:,}, busiest {r.max_worker_share:.0%}  equal: {mark(check.equal)}"
        )
    return lines


def show_routing(runs: Sequence[PlanRun], scaling: Scaling) -> None:
    """The routing view of a run: per router, per session, per worker, the failover, and the same
    sessions on more workers."""
    console.print(routers_table(runs))
    console.print(f"[dim]{ROUTERS_LEGEND}[/]")
    console.print(session_table(runs))
    console.print(counters_table(runs))
    all_agree = all(t.counters_agree for run in runs for t in run.sent.tallies)
    console.print(
        f"every worker's /metrics prefix-cache counters agree with the per-request sums: {mark(all_agree)}"
    )
    for run in runs:
        if run.failover is not None:
            console.print(failover_panel(run.failover))
    for table in scaling_tables(scaling):
        console.print(table)
    console.print(f"[dim]{SCALING_LEGEND}[/]")
    for line in real_run_lines(scaling):
        console.print(line)
