"""Lesson 4: route every request of a session to the same worker, not round robin.

With several engine workers behind a router, each worker keeps its *own* prefix cache. A
multi-turn session (an agent's conversation) reuses its prefix only when turn t + 1 lands on a
worker that already computed turn t. Send the turns of one conversation to different workers
and each of them sees fragments: it recomputes the session's history from the first token it
has not seen, while the worker that has it all cached sits idle. Keeping a session on one
worker is called *session affinity*.

WRONG: round robin (or random). Request k goes to worker k mod N, whoever sent it. Whether a
session's next turn lands where its last one did depends only on how many other requests
arrived in between: with sessions whose users think for random times, a coin flip.
(With S sessions taking turns in a fixed cycle and N dividing S, round robin sticks every
session to one worker by accident: the arrival process here is random and seeded instead.)

RIGHT: consistent hashing of the session id. Each worker owns many points on a hash ring; a
session goes to the first point clockwise from hash(session_id), every time. When a worker
dies, only *its* sessions move, each to the next worker on the ring, and only they pay for a
cold cache once; every other session keeps its worker and its cached prefix.

Production routers do exactly this: vLLM production-stack's router with ``--routing-logic
session --session-key <header>``; ``vllm-router`` (PyPI) with ``--policy consistent_hash``,
keyed by the ``X-Session-ID`` header (``--router vllm-router`` runs it here, in front of the
same workers); OpenAI's API, where ``prompt_cache_key`` joins the hash that picks the machines;
and SGLang's router and llm-d's scheduler, which refine it with prefix-aware scoring (send a
request where the longest prefix of its tokens is already cached).

How big the difference is depends on what the sessions share and on N. Every worker caches the
shared system prompt whatever the router does, so routing decides only the tokens that are each
session's own (the "own-token hit" column). And with N = 2 round robin is a coin flip per turn,
and the other worker may still hold an older prefix of the session, so a scattered turn often
loses only the newest part of the history; with more workers a scattered turn less and less
often lands on one that has seen the session at all, and the loss grows towards all of it.
``--cache-salt session`` gives each session its own cache namespace, as a deployment isolating
its users does: then sessions share nothing, not even the system prompt.

At production scale (8 to 64 workers) that is the whole story, and two workers cannot show it.
The harness predicts every request's cached tokens exactly, so after the real runs the lesson
replays the same sessions over N = 2 to 32 simulated workers, under round robin, random,
consistent hashing, consistent hashing with bounded loads and a prefix-aware router, each
worker with a KV cache of bounded size that evicts the way vLLM does. Every simulated figure is
labelled so; the N that ran for real is replayed too and must equal what the engines measured.

What the script measures, on real vLLM servers (started here, or yours with --endpoints):
per request the worker, the prompt tokens, the engine's ``cached_tokens`` and the TTFT of the
streamed reply, next to the cached tokens the harness predicted for that worker's cache; per
worker the delta of its ``/metrics`` prefix-cache counters, which must equal the per-request
sums. Every router run starts cold: it gets a fresh ``cache_salt`` (by default shared by its
sessions, so sessions on one worker share the system prompt's blocks, as in production).

Run:
    python session_consistency.py                       # 2 local workers, default model
    python session_consistency.py --quick --json out.json
    python session_consistency.py --router vllm-router  # the PyPI vllm-router in front
    python session_consistency.py --endpoints http://10.0.0.5:8000,http://10.0.0.6:8000
    python session_consistency.py --scale-plot scaling.png   # the simulated scaling, as a picture
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.api_key import API_KEY_FLAG, NO_API_KEY, ApiKey, api_key_from
from harness.backend import Backend, Message
from harness.cli import engine_options, exit_with, lesson_main
from harness.console import console
from harness.errors import UserError
from harness.fleet import (
    ROUTED_BY,
    Fleet,
    dispatch,
    failover_report,
    local_fleet,
    parse_endpoints,
    remote_fleet,
    warm_up,
)
from harness.live import live_variant
from harness.measure import RequestRecord, VariantResult
from harness.model import resolve_model
from harness.outputs import writable_target
from harness.plots import plot_scaling
from harness.report import ExampleResult
from harness.routing import DEFAULT_BALANCE_FACTOR, arrival_schedule, session_number
from harness.routing_report import PlanRun, RunPlan, Scaling, real_run_checks, show_routing
from harness.routing_sim import (
    SCALING_ROUTERS,
    SCALING_WORKERS,
    Workload,
    blocks_needed,
    run_salts,
    scaling_study,
    shared_prefix_len,
    simulate,
)
from harness.scenario import TASK, action_text, observation_text, system_prompt, trace
from harness.workers import AsyncWorkerClient, probe_endpoint

EXAMPLE = "session_consistency"
# run_all_examples.py: this lesson starts its own engine workers (or uses --endpoints), so the
# shared embedded engine should be closed before run() is called, to free its memory.
OWN_ENGINES = True
# The per-request columns the tables add (run_all_examples.py passes them to report.show).
TABLE_COLUMNS = ("session", "turn", "worker")

DEFAULT_WORKERS = 2
DEFAULT_SESSIONS, QUICK_SESSIONS = 6, 4
DEFAULT_TURNS, QUICK_TURNS = 3, 3
# Lines of CI log the engineer pasted into each session's first message: the session's own
# context, which only its worker can have cached (full: ~350 tokens; quick: ~250). Longer logs
# widen nothing (the own-token gap stays at ~0.3 either way, by simulation) but each worker
# prefills them cold on one core, which is most of this lesson's wall time.
LOG_LINES, QUICK_LOG_LINES = 8, 6
DEFAULT_THINK_MS = 400
# Each simulated worker's KV cache: room for the shared system prompt and about two sessions'
# own history at the defaults, so a worker given more sessions than that evicts (the real
# workers hold over 1,400 blocks of 32 and never do in this lesson).
DEFAULT_SCALE_CACHE_TOKENS = 2560

SERVICES = ("billing", "search", "checkout", "inventory", "payments", "shipping", "accounts", "ledger")
LOG_MODULES = ("models", "api", "rounding", "tax", "export", "cache", "auth", "events", "queue")


# --- the sessions: one shared system prompt, then each session's own conversation -------------


def service_of(index: int) -> str:
    name = SERVICES[index % len(SERVICES)]
    return name if index < len(SERVICES) else f"{name}{index // len(SERVICES) + 1}"


def ci_log(index: int, lines: int) -> str:
    """A CI log as an engineer pastes it: seeded by the session, so every run renders it alike."""
    rng = random.Random(f"ci-log-{index}")
    svc = service_of(index)
    clock = 3 * 3600 + rng.randrange(1800)
    rows = []
    for k in range(lines):
        clock += rng.randrange(1, 9)
        module = rng.choice(LOG_MODULES)
        failed = k == lines - 2
        status = "FAILED" if failed else "PASSED"
        stamp = f"{clock // 3600:02d}:{clock // 60 % 60:02d}:{clock % 60:02d}"
        case = "test_invoice_rounding" if failed else f"test_{module}_{rng.randrange(100, 999)}"
        rows.append(
            f"{stamp} services/{svc}/tests/test_{module}.py::{case} {status} ({rng.randrange(3, 900)} ms)"
        )
    rows.append(
        f"{stamp} ===== 1 failed, {lines - 1} passed in {rng.randrange(20, 90)}.{rng.randrange(10, 99)}s"
    )
    return "\n".join(rows)


def first_message(index: int, quick: bool) -> str:
    """The session's opening request: where it stops sharing tokens with every other session."""
    lines = QUICK_LOG_LINES if quick else LOG_LINES
    task = TASK.replace("billing", service_of(index))
    return f"Ticket KV-{4100 + index}. {task}\n\nCI log (last {lines} lines):\n{ci_log(index, lines)}"


def session_requests(index: int, turns: int, quick: bool) -> list[list[Message]]:
    """Every turn of session ``index``: the same system prompt, then its own growing history.

    The history is append-only (lesson 2), so each turn's prompt extends the previous one and
    a worker that served the previous turn has all of it but the newest messages cached.
    """
    svc = service_of(index)
    messages: list[Message] = [
        {"role": "system", "content": system_prompt(quick)},
        {"role": "user", "content": first_message(index, quick)},
    ]
    requests = [list(messages)]
    for step in trace(turns - 1):
        messages.append({"role": "assistant", "content": action_text(step).replace("billing", svc)})
        messages.append({"role": "user", "content": observation_text(step).replace("billing", svc)})
        requests.append(list(messages))
    return requests


# --- WRONG and RIGHT: the routing plans ---------------------------------------------------------

# The whole lesson in two lines: the same sessions, the same workers; only what picks the worker
# differs, the request counter or the session id.
WRONG = RunPlan("wrong", "round_robin", "round robin: request k goes to worker k mod N, whatever its session")
RIGHT = RunPlan("right", "session", "consistent hash of session_id: each session stays on its worker")
RANDOM = RunPlan("random", "random", "random worker per request (seeded)")


def plans(settings: Settings) -> list[RunPlan]:
    """The router runs, WRONG first. Each starts cold (its own cache_salt)."""
    runs = [WRONG, RIGHT]
    if settings.with_random:
        runs.append(RANDOM)
    if settings.kill_at is not None:
        runs.append(replace(RIGHT, name="failover", how="consistent hash", kill_at=settings.kill_at))
    return runs


# --- the run -------------------------------------------------------------------------------------


def run(backend: Backend | None, args: argparse.Namespace) -> ExampleResult:
    """The lesson, as run_all_examples.py calls it. ``backend`` is not used: this lesson needs
    several workers, so it starts its own (or uses --endpoints)."""
    del backend
    settings = settings_from(args)
    with open_fleet(settings, args) as fleet:
        result = asyncio.run(run_lesson(fleet, settings))
    if settings.scale_plot is not None:
        checks = result.scaling.checks
        plot_scaling(result.scaling.rows, [c.measured for c in checks], settings.scale_plot)
        console.print(f"[dim]wrote {settings.scale_plot}[/]")
    return result


@contextlib.contextmanager
def open_fleet(settings: Settings, args: argparse.Namespace) -> Iterator[Fleet]:
    """The workers: the servers named by --endpoints, or local ones started (and stopped) here."""
    if settings.endpoints:
        with remote_fleet(settings.endpoints, settings.api_key) as fleet:
            yield fleet
        return
    opts, name = engine_options(args), resolve_model(args.model).display_name
    with local_fleet(opts, name, settings.workers) as fleet:
        yield fleet


async def run_lesson(fleet: Fleet, settings: Settings) -> RoutingResult:
    """Tokenize the sessions, simulate them on more workers, then run every plan for real."""
    clients = {w.name: AsyncWorkerClient(w.url, fleet.model, api_key=fleet.api_key) for w in fleet.workers}
    try:
        with console.status("tokenizing the sessions and warming up the workers ..."):
            workload = await build_workload(settings, clients[fleet.names[0]])
            await warm_up(clients)
        cache_blocks = simulated_cache_blocks(settings, fleet.block_size, workload)
        # Simulated before anything is sent, like every run's expectation.
        salts = run_salts(workload.arrivals, "scaling", settings.salt_per_session)
        rows = scaling_study(
            workload, salts, fleet.block_size, settings.seed, cache_blocks, settings.scale_workers
        )
        runs: list[PlanRun] = []
        for plan in plans(settings):
            # each request as it completes, and each worker's hit rate so far
            with live_variant(console, plan.name, settings.requests) as live:
                on_done = lambda record, live=live: live.add(record, record.extra["worker"])  # noqa: E731
                runs.append(await run_plan(fleet, clients, settings, workload, plan, on_done))
    finally:
        for client in clients.values():
            await client.close()
    checks = real_run_checks(
        runs,
        workload,
        len(fleet.names),
        fleet.block_size,
        fleet.num_gpu_blocks,
        settings.seed,
        settings.salt_per_session,
    )
    scaling = Scaling(settings.sessions, settings.scale_workers, fleet.block_size, cache_blocks, rows, checks)
    return RoutingResult(
        EXAMPLE,
        fleet.info,
        [r.variant for r in runs],
        notes=notes(fleet, settings, workload),
        fleet=fleet,
        settings=settings,
        workload=workload,
        runs=runs,
        scaling=scaling,
    )


async def build_workload(settings: Settings, client: AsyncWorkerClient) -> Workload:
    arrivals = arrival_schedule(settings.sessions, settings.turns, settings.seed, settings.think_s)
    per_session = {s: session_requests(s, settings.turns, settings.quick) for s in range(settings.sessions)}
    messages = [per_session[session_number(sid)][turn] for _, sid, turn in arrivals]
    prompts = await asyncio.gather(*(client.tokenize(m) for m in messages))
    system_only = await client.tokenize([{"role": "system", "content": system_prompt(settings.quick)}])
    return Workload(arrivals, messages, list(prompts), len(system_only), shared_prefix_len(prompts))


def simulated_cache_blocks(settings: Settings, block_size: int, workload: Workload) -> int | None:
    """Each simulated worker's KV blocks: fails, before any request is sent, when the longest
    prompt would not fit."""
    if not settings.scale_cache_tokens:
        return None
    blocks = settings.scale_cache_tokens // block_size
    needed = blocks_needed(workload.prompts, block_size)
    if blocks < needed:
        raise UserError(
            f"--scale-cache-tokens {settings.scale_cache_tokens} is {blocks} blocks of {block_size}; "
            f"the longest prompt needs {needed} ({needed * block_size} tokens)"
        )
    return blocks


async def run_plan(
    fleet: Fleet,
    clients: dict[str, AsyncWorkerClient],
    settings: Settings,
    workload: Workload,
    plan: RunPlan,
    on_done: Callable[[RequestRecord], None],
) -> PlanRun:
    """One plan: its expectation simulated first, then its requests sent to the workers."""
    salt = f"{plan.name}-{secrets.token_hex(6)}"  # a fresh namespace: this run starts cold
    salts = run_salts(workload.arrivals, salt, settings.salt_per_session)
    names, block = fleet.names, fleet.block_size
    expected = simulate(
        plan.policy, workload.arrivals, workload.prompts, names, block, settings.seed, salts, plan.kill_at
    )
    sent = await dispatch(
        fleet,
        clients,
        workload,
        salts,
        plan.policy,
        settings.router,
        seed=settings.seed,
        max_tokens=settings.max_tokens,
        kill_at=plan.kill_at,
        on_done=on_done,
    )
    records = sent.records
    report = None
    if sent.failover is not None:
        report = failover_report(sent.failover, records, names, settings.router, len(expected.workers))
    own = workload.own_tokens_hit_rate(
        [r.prompt_tokens for r in records], [r.cached_tokens for r in records], block
    )
    variant = VariantResult(plan.name, plan.label(settings.router), records, sent.counters)
    return PlanRun(plan, plan.router(settings.router), salt, expected, sent, variant, own, report)


def notes(fleet: Fleet, settings: Settings, workload: Workload) -> list[str]:
    lengths = [len(p) for p in workload.prompts]
    salt_scope = "one per session (sessions share no block)" if settings.salt_per_session else "one per run"
    out = [
        f"{settings.sessions} sessions x {settings.turns} turns on {len(fleet.names)} workers; arrivals "
        f"seeded (seed {settings.seed}, mean think {settings.think_s * 1000:.0f} ms); every run starts cold "
        "(fresh cache_salt) and routes the same arrival order",
        f"system prompt {workload.system_tokens} tokens, the same in every session; prompts "
        f"{min(lengths)}-{max(lengths)} tokens; cache_salt: {salt_scope}",
    ]
    if settings.router == "vllm-router":
        out.append(
            "vllm-router picks the worker; one request at a time, so which one it picked is read from "
            "the workers' /metrics and predicted == engine stays exact"
        )
    else:
        out.append(
            "each worker serves one request at a time (workers in parallel): predicted == engine is exact"
        )
    return out


# --- what the runs show ----------------------------------------------------------------------------


@dataclass(kw_only=True)
class RoutingResult(ExampleResult):
    """Lesson 4's result: typed until ``to_json``."""

    fleet: Fleet
    settings: Settings
    workload: Workload
    runs: list[PlanRun]
    scaling: Scaling

    def run(self, name: str) -> PlanRun:
        return next(r for r in self.runs if r.plan.name == name)

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        out = super().to_json()
        out["workers"] = [
            {"name": w.name, "url": w.url, "started_here": w.process is not None} for w in self.fleet.workers
        ]
        out["settings"] = {
            "sessions": s.sessions,
            "turns": s.turns,
            "seed": s.seed,
            "think_ms": round(s.think_s * 1000),
            "kill_worker_at": s.kill_at,
            "router": s.router,
        }
        out["routing"] = {run.plan.name: run.to_json() for run in self.runs}
        out["shared_prefix_tokens"] = self.workload.shared_tokens
        out["scaling_settings"] = {
            "simulated": True,
            "workers": list(s.scale_workers),
            "routers": list(SCALING_ROUTERS),
            "cache_tokens_per_worker": s.scale_cache_tokens or None,
            "cache_blocks_per_worker": self.scaling.cache_blocks,
            "real_workers_num_gpu_blocks": self.fleet.num_gpu_blocks,
            "balance_factor": DEFAULT_BALANCE_FACTOR,
        }
        out["scaling"] = self.scaling.to_json()
        return out


def headline(result: ExampleResult) -> str:
    """The lesson's own figure, for the runner's summary: what routing decides."""
    if not isinstance(result, RoutingResult):
        return ""
    wrong, right = result.run("wrong"), result.run("right")
    return f"own-token hit {wrong.own_tokens_hit_rate:.1%} -> {right.own_tokens_hit_rate:.1%}"


def show_details(result: ExampleResult) -> None:
    """The routing view of the run: per router, per session, per worker, the failover, and the
    same sessions on more (simulated) workers."""
    if not isinstance(result, RoutingResult):
        raise TypeError(f"lesson 4 shows its own results, not {type(result).__name__}")
    show_routing(result.runs, result.scaling)


# --- the flags ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    workers: int
    endpoints: list[str] | None
    sessions: int
    turns: int
    seed: int
    think_s: float
    kill_at: int | None
    router: str  # who routes: script | vllm-router
    quick: bool
    max_tokens: int
    with_random: bool
    salt_per_session: bool
    scale_workers: tuple[int, ...]
    scale_cache_tokens: int  # each simulated worker's KV cache; 0: unbounded
    scale_plot: Path | None
    api_key: ApiKey = NO_API_KEY  # the --endpoints servers' key

    @property
    def requests(self) -> int:
        return self.sessions * self.turns


def parse_worker_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        counts = ()
    if not counts or not all(1 <= n <= 1024 for n in counts):
        raise UserError(f"--scale-workers must be comma-separated worker counts from 1 to 1024, got {text!r}")
    return counts


def settings_from(args: argparse.Namespace) -> Settings:
    """Validate the lesson's flags; every mistake is a one-line error before any work."""
    sessions = int(args.sessions or (QUICK_SESSIONS if args.quick else DEFAULT_SESSIONS))
    turns = int(args.turns or (QUICK_TURNS if args.quick else DEFAULT_TURNS))
    endpoints = parse_endpoints(args.endpoints) if args.endpoints else None
    workers = len(endpoints) if endpoints else int(args.workers)
    if workers < 2:
        raise UserError(f"--workers must be at least 2 (routing needs a choice), got {workers}")
    if sessions < 1:
        raise UserError(f"--sessions must be at least 1, got {sessions}")
    if turns < 2:
        raise UserError(f"--turns must be at least 2 (a cache can only help from the second), got {turns}")
    if args.think_ms <= 0:
        raise UserError(f"--think-ms must be positive, got {args.think_ms}")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.scale_cache_tokens < 0:
        raise UserError(f"--scale-cache-tokens must be 0 (unbounded) or more, got {args.scale_cache_tokens}")
    total = sessions * turns
    kill_at: int | None
    if args.kill_worker_at is None:  # default: a third of the way in, so moved sessions recover
        kill_at = None if endpoints else max(1, total // 3)
    else:
        kill_at = int(args.kill_worker_at) or None
        if kill_at is not None and not 1 <= kill_at < total:
            raise UserError(
                f"--kill-worker-at must be between 1 and {total - 1} (0: no failover run), got {kill_at}"
            )
        if kill_at is not None and endpoints:
            raise UserError(
                "--kill-worker-at needs workers this script started: it never stops servers it does not own"
            )
    plot = None
    if args.scale_plot:
        if not str(args.scale_plot).endswith(".png"):
            raise UserError(
                f"--scale-plot writes a PNG: give a file name ending in .png, got {args.scale_plot}"
            )
        plot = writable_target("--scale-plot", args.scale_plot)
    return Settings(
        workers=workers,
        endpoints=endpoints,
        sessions=sessions,
        turns=turns,
        seed=int(args.seed),
        think_s=args.think_ms / 1000.0,
        kill_at=kill_at,
        router=args.router,
        quick=bool(args.quick),
        max_tokens=int(args.max_tokens),
        with_random=bool(args.with_random),
        salt_per_session=args.cache_salt == "session",
        scale_workers=parse_worker_counts(args.scale_workers),
        scale_cache_tokens=int(args.scale_cache_tokens),
        scale_plot=plot,
        api_key=api_key_from(args.api_key) if endpoints else NO_API_KEY,
    )


def check_args(args: argparse.Namespace) -> Settings:
    """Everything that can fail before a server starts: the flags, then unreachable --endpoints."""
    if args.endpoint:
        raise UserError("lesson 4 needs several workers: give them as --endpoints URL1,URL2")
    settings = settings_from(args)
    if args.api_key is not None and not settings.endpoints:
        raise UserError(f"{API_KEY_FLAG} goes with --endpoints: the workers this lesson starts take no key")
    for url in settings.endpoints or ():
        probe_endpoint(url, api_key=settings.api_key)
    return settings


def add_lesson_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("lesson 4: workers and routing")
    g.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"local vLLM workers to start, each on its own cores (default {DEFAULT_WORKERS})",
    )
    g.add_argument(
        "--endpoints",
        metavar="URL1,URL2,...",
        help="use these running vLLM servers as the workers (started with --enable-prefix-caching "
        "--enable-prompt-tokens-details), on any machines, instead of starting local ones",
    )
    g.add_argument(
        "--sessions",
        type=int,
        default=None,
        help=f"concurrent agent sessions (default {DEFAULT_SESSIONS}, {QUICK_SESSIONS} with --quick)",
    )
    g.add_argument(
        "--turns",
        type=int,
        default=None,
        help=f"turns per session (default {DEFAULT_TURNS}, {QUICK_TURNS} with --quick)",
    )
    g.add_argument(
        "--router",
        choices=ROUTED_BY,
        default="script",
        help="who routes: this script's own routers, or the PyPI vllm-router (round_robin vs "
        "consistent_hash on X-Session-ID) started in front of the workers (default: script)",
    )
    g.add_argument(
        "--kill-worker-at",
        type=int,
        default=None,
        metavar="K",
        help="in an extra session-routed run, crash one worker after K requests (0: no such run; "
        "default: a third of the requests; local workers only)",
    )
    g.add_argument(
        "--cache-salt",
        choices=["run", "session"],
        default="run",
        help="run: one cache_salt per router run, shared by its sessions, so sessions on a worker "
        "share the system prompt's blocks (default); session: one per session, as a deployment "
        "isolating its users' caches does, so sessions share nothing, not even the system prompt",
    )
    g.add_argument(
        "--with-random",
        action="store_true",
        help="add a run with a random router (it lands between the two; one more run of every request)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the arrival process and the random router")
    g.add_argument(
        "--think-ms",
        type=float,
        default=DEFAULT_THINK_MS,
        help=f"mean pause between a session's turns, scaled down from minutes (default {DEFAULT_THINK_MS}); "
        "it changes how much runs in parallel, never the arrival order",
    )
    s = parser.add_argument_group("lesson 4: the same sessions on more workers (simulated)")
    s.add_argument(
        "--scale-workers",
        default=",".join(str(n) for n in SCALING_WORKERS),
        metavar="N1,N2,...",
        help="worker counts to replay the sessions over (default: %(default)s)",
    )
    s.add_argument(
        "--scale-cache-tokens",
        type=int,
        default=DEFAULT_SCALE_CACHE_TOKENS,
        metavar="T",
        help="each simulated worker's KV cache, in tokens, at least the longest prompt (whole blocks; "
        f"default {DEFAULT_SCALE_CACHE_TOKENS}: the system prompt and about two sessions; 0: unbounded)",
    )
    s.add_argument("--scale-plot", metavar="PNG", help="also draw the scaling table into this PNG")


def main(argv: list[str] | None = None) -> int:
    return lesson_main(
        argv,
        __doc__,
        add_args=add_lesson_args,
        check_args=check_args,
        run=run,
        show_details=show_details,
        table_columns=TABLE_COLUMNS,
        shared_engine=False,
    )


if __name__ == "__main__":
    exit_with(main)
