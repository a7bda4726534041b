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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from harness.backend import Backend, EngineInfo, Message, PrefixCounters
from harness.cli import engine_options, exit_with, lesson_parser
from harness.console import console
from harness.errors import UserError
from harness.measure import RequestRecord, VariantResult
from harness.model import resolve_model
from harness.prefix import PrefixCacheModel, common_prefix_len
from harness.report import ExampleResult, check_json_target, show, write_json
from harness.routing import (
    Arrival,
    ConsistentHashRouter,
    NoWorkersError,
    Router,
    any_seen_fraction,
    arrival_schedule,
    make_router,
    sticky_fraction,
)
from harness.scenario import TASK, action_text, observation_text, system_prompt, trace
from harness.servers import LocalServers, ServerProcess
from harness.workers import (
    AsyncWorkerClient,
    VllmRouter,
    Worker,
    WorkerUnavailable,
    crash,
    probe_endpoint,
)

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
# Through vllm-router, a request whose worker died is retried by the client (see attempt_via_proxy).
PROXY_ATTEMPTS, PROXY_RETRY_S = 20, 0.25

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


def session_number(session: str) -> int:
    return int(session.rsplit("-", 1)[1])


# --- what each router should give, worked out before anything is sent -------------------------


@dataclass(frozen=True)
class Expected:
    workers: list[str]  # where each arrival goes, in arrival order
    cached: list[int]  # the cached tokens predicted there
    prompt_tokens: int

    @property
    def hit_rate(self) -> float:
        return sum(self.cached) / self.prompt_tokens if self.prompt_tokens else 0.0


def simulate(
    policy: str,
    arrivals: Sequence[Arrival],
    prompts: Sequence[Sequence[int]],
    workers: Sequence[str],
    block_size: int,
    seed: int,
    salts: Sequence[str],
    kill_at: int | None = None,
) -> Expected:
    """Route the arrivals with a fresh router and replay them through one cache model per worker.

    The run below sends the requests in this very order and each worker serves its own in the
    order they were routed, so for the plain runs this *is* what the engines will report; for
    the failover run it assumes the crashed worker's queued requests reach their new worker in
    arrival order.
    """
    router = make_router(policy, workers, seed)
    caches = WorkerCaches(block_size)
    chosen, cached = [], []
    for index, ((_, sid, _), prompt, salt) in enumerate(zip(arrivals, prompts, salts, strict=True)):
        if index == kill_at:
            router.remove_worker(router.route(sid, index))
        worker = router.route(sid, index)
        chosen.append(worker)
        cached.append(caches.of(worker, salt).predict(prompt).cached_tokens)
        caches.of(worker, salt).record(prompt)
    return Expected(chosen, cached, sum(len(p) for p in prompts))


class WorkerCaches:
    """What each worker's prefix cache holds: one cache model per (worker, cache_salt).

    vLLM mixes the salt into the first block's hash, so prompts under different salts share
    nothing, however many tokens they have in common.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._models: dict[tuple[str, str], PrefixCacheModel] = {}

    def of(self, worker: str, salt: str) -> PrefixCacheModel:
        key = (worker, salt)
        if key not in self._models:
            self._models[key] = PrefixCacheModel(self.block_size)
        return self._models[key]


# --- the workers -------------------------------------------------------------------------------


@dataclass
class Fleet:
    workers: list[Worker]
    model: str  # the name the servers serve it under
    block_size: int
    info: EngineInfo
    owned: bool  # started here (so the failover run may crash one)

    def worker(self, name: str) -> Worker:
        return next(w for w in self.workers if w.name == name)


def parse_endpoints(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if len(urls) < 2:
        raise UserError(f"--endpoints needs at least two comma-separated URLs, got {text!r}")
    if len(set(urls)) != len(urls):
        raise UserError(f"--endpoints names the same URL twice: {text}")
    return urls


def fleet_from_endpoints(urls: Sequence[str]) -> Fleet:
    """Existing servers (any machines). All are checked before any work starts."""
    infos = [probe_endpoint(u) for u in urls]
    if len({i.model for i in infos}) > 1 or len({i.block_size for i in infos}) > 1:
        seen = ", ".join(f"{u}: {i.model} (block {i.block_size})" for u, i in zip(urls, infos, strict=True))
        raise UserError(f"--endpoints must serve the same model with the same block size: {seen}")
    workers = [Worker(f"worker-{i}", u.rstrip("/").removesuffix("/v1")) for i, u in enumerate(urls)]
    first = infos[0]
    info = EngineInfo(
        "vllm-server", first.model, "remote", first.block_size, first.vllm_version, ",".join(urls)
    )
    return Fleet(workers, first.model, first.block_size, info, owned=False)


@contextlib.contextmanager
def open_fleet(args: argparse.Namespace) -> Iterator[Fleet]:
    """The workers: the servers named by --endpoints, or N local ones started (and stopped) here."""
    if args.endpoints:
        yield fleet_from_endpoints(parse_endpoints(args.endpoints))
        return
    opts = engine_options(args)
    name = resolve_model(args.model).display_name
    with (
        console.status(
            f"starting {args.workers} vLLM workers with {name} (1-2 minutes on CPU) ..."
        ) as status,
        LocalServers(opts, count=args.workers, on_status=lambda msg: status.update(msg)) as servers,
    ):
        yield fleet_from_servers(servers, name, opts.resolved_device())


def fleet_from_servers(servers: Sequence[ServerProcess], display_name: str, device: str) -> Fleet:
    """Servers this program started (``harness.servers.LocalServers``): it may crash one."""
    info = probe_endpoint(servers[0].url)
    workers = [Worker(s.name, s.url, s.process) for s in servers]
    urls = ",".join(w.url for w in workers)
    engine = EngineInfo("vllm-server", display_name, device, info.block_size, info.vllm_version, urls)
    return Fleet(workers, info.model, info.block_size, engine, owned=True)


# --- one router's run --------------------------------------------------------------------------


@dataclass
class Job:
    """One arrival: a session's turn, its messages, and what happened to it."""

    index: int
    session: str
    turn: int
    at_s: float
    messages: list[Message]
    prompt_ids: list[int]
    salt: str  # its cache namespace: the run's, or the run's and its session's
    done: asyncio.Future[RequestRecord]
    route: list[str] = field(default_factory=list)  # workers it was sent to, in order


@dataclass
class Failover:
    victim: str
    after_requests: int  # the victim crashed while request number ``after_requests`` was in flight
    retried: list[int]  # requests that failed on the dead worker and were answered by another
    moved: list[int]  # requests queued for the victim that went to their next worker unsent


@dataclass(frozen=True)
class RunPlan:
    name: str  # the variant name in the JSON: wrong / right / random / failover
    label: str
    policy: str  # round_robin | random | session
    via: str = "script"  # script | vllm-router
    kill_at: int | None = None


def vllm_router_policy(plan: RunPlan) -> str:
    return "consistent_hash" if plan.policy == "session" else plan.policy


@dataclass
class RouterRun:
    plan: RunPlan
    variant: VariantResult
    expected: Expected
    salt: str
    per_worker: dict[str, dict[str, Any]]
    failover: Failover | None
    wall_s: float

    def assignments(self) -> list[tuple[str, str]]:
        return [(r.extra["session"], r.extra["worker"]) for r in self.variant.requests]


class RoutedRun:
    """Send one schedule of arrivals through one router to the workers, and keep the truth.

    Three rules keep every number exact:
    * arrivals are routed in schedule order, a turn only once its session's previous reply is
      back (a user reads before answering), so every run routes the same sequence;
    * each worker serves one request at a time, in the order they were routed to it. vLLM
      registers a prompt's blocks as cached when it *schedules* them, so a request that joins
      while another is mid-prefill may find some of its blocks or not, depending on which
      engine step it is admitted in. One at a time per worker, the cache model knows the
      worker's exact cache state when each request starts; the workers still run in parallel;
    * a request that fails because its worker died is retried on the session's next worker on
      the ring, and so are the requests queued for the dead worker: none is lost.
    """

    def __init__(
        self,
        fleet: Fleet,
        clients: dict[str, AsyncWorkerClient],
        plan: RunPlan,
        jobs: list[Job],
        max_tokens: int,
        seed: int,
        on_done: Callable[[], None],
        proxy: AsyncWorkerClient | None = None,
    ) -> None:
        self.fleet = fleet
        self.clients = clients
        self.plan = plan
        self.jobs = jobs
        self.max_tokens = max_tokens
        self.on_done = on_done
        self.proxy = proxy  # vllm-router: it picks the worker, we find out which from /metrics
        names = [w.name for w in fleet.workers]
        self.router: Router = make_router(plan.policy, names, seed)
        self.names = names
        self.caches = WorkerCaches(fleet.block_size)
        lanes = ["vllm-router"] if proxy is not None else names
        self.queues: dict[str, asyncio.Queue[Job | None]] = {lane: asyncio.Queue() for lane in lanes}
        self.served: dict[str, list[RequestRecord]] = {n: [] for n in names}
        self.final_counters: dict[str, PrefixCounters] = {}  # a crashed worker's last readable counters
        self.failover: Failover | None = None
        self.dead: set[str] = set()

    # dispatch: the router's decisions, in arrival order

    async def dispatch(self) -> None:
        start = time.monotonic()
        previous: dict[str, Job] = {}
        for job in self.jobs:
            delay = job.at_s - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if job.session in previous:
                await previous[job.session].done
            lane = "vllm-router" if self.proxy is not None else self.router.route(job.session, job.index)
            job.route.append(lane)
            self.queues[lane].put_nowait(job)
            previous[job.session] = job

    # serve: one worker, one request at a time

    async def serve(self, name: str) -> None:
        queue = self.queues[name]
        while (job := await queue.get()) is not None:
            try:
                record = await self.attempt(name, job)
            except WorkerUnavailable as exc:
                await self.fail_over(name, job, exc)
                return
            job.done.set_result(record)
            self.on_done()

    async def attempt(self, name: str, job: Job) -> RequestRecord:
        model, client = self.caches.of(name, job.salt), self.clients[name]
        prediction = model.predict(job.prompt_ids)  # made before the worker answers
        on_accepted = None
        if job.index == self.plan.kill_at and self.failover is None:
            # Its last counters first (everything it served so far), then crash it while this
            # request is in flight: accepted by the worker, no token back yet.
            self.final_counters[name] = await client.settled_counters(self.expected_counters(name))
            on_accepted = partial(self.crash, name, job)
        served = await client.chat(job.messages, job.salt, self.max_tokens, on_accepted=on_accepted)
        prompt_ids = served.prompt_token_ids or job.prompt_ids
        if prompt_ids != job.prompt_ids:  # the engine rendered the chat differently: use what it saw
            prediction = model.predict(prompt_ids)
        model.record(prompt_ids, served.output_token_ids)
        record = self.record(job, name, served.prompt_tokens, served.cached_tokens, served.ttft_ms)
        record.predicted_cached_tokens = prediction.cached_tokens
        record.first_divergence = prediction.common_prefix
        self.served[name].append(record)
        return record

    async def crash(self, name: str, job: Job) -> None:
        process = self.fleet.worker(name).process
        if process is None:
            raise UserError("the failover run needs workers started by this script")
        await asyncio.to_thread(crash, process)
        self.failover = Failover(name, job.index, [], [])
        self.dead.add(name)

    async def fail_over(self, name: str, job: Job, exc: Exception) -> None:
        """The worker is gone: take it off the ring and send its requests to their next worker."""
        if name not in self.dead and await self.clients[name].healthy():
            raise UserError(f"a request to {name} failed while the worker is up: {exc}")
        self.dead.add(name)
        self.router.remove_worker(name)
        if self.failover is None:  # it died without us: still survive it
            self.failover = Failover(name, job.index, [], [])
        self.failover.retried.append(job.index)
        pending = [job]
        queue = self.queues[name]
        while not queue.empty():
            queued = queue.get_nowait()
            if queued is not None:
                pending.append(queued)
                self.failover.moved.append(queued.index)
        try:
            for moved in pending:
                worker = self.router.route(moved.session, moved.index)
                moved.route.append(worker)
                self.queues[worker].put_nowait(moved)
        except NoWorkersError as err:
            raise UserError("every worker has failed: no request can be answered") from err

    # serve through vllm-router: it routes; the workers' counters say where it went

    async def serve_via_proxy(self) -> None:
        assert self.proxy is not None
        queue = self.queues["vllm-router"]
        while (job := await queue.get()) is not None:
            record = await self.attempt_via_proxy(job)
            job.done.set_result(record)
            self.on_done()

    async def attempt_via_proxy(self, job: Job) -> RequestRecord:
        """Send through vllm-router until answered. After a worker dies, vllm-router keeps
        hashing its sessions to it (answering HTTP 500 once its own retries fail) until its
        circuit breaker opens and it rebuilds the ring without it; the client retries meanwhile."""
        assert self.proxy is not None
        for attempt in range(1, PROXY_ATTEMPTS + 1):
            live = [n for n in self.names if n not in self.dead]
            # One prediction per worker it may pick, all made before anything is sent.
            predictions = {n: self.caches.of(n, job.salt).predict(job.prompt_ids) for n in live}
            before = {n: await self.clients[n].counters() for n in live}
            on_accepted = None
            if job.index == self.plan.kill_at and self.failover is None:
                victim = self.home_of(job.session) or live[-1]
                self.final_counters[victim] = await self.clients[victim].settled_counters(
                    self.expected_counters(victim)
                )
                on_accepted = partial(self.crash, victim, job)
            try:
                served = await self.proxy.chat(
                    job.messages,
                    job.salt,
                    self.max_tokens,
                    headers={"X-Session-ID": job.session},
                    on_accepted=on_accepted,
                )
            except WorkerUnavailable:
                if self.failover is None:
                    raise
                if job.index not in self.failover.retried:
                    self.failover.retried.append(job.index)
                    job.route.insert(0, self.failover.victim)
                await asyncio.sleep(PROXY_RETRY_S * attempt)
                continue
            name = await self.attribute(before, served.prompt_tokens, job)
            job.route[-1] = name
            prompt_ids = served.prompt_token_ids or job.prompt_ids
            prediction = predictions[name]
            if prompt_ids != job.prompt_ids:
                prediction = self.caches.of(name, job.salt).predict(prompt_ids)
            self.caches.of(name, job.salt).record(prompt_ids, served.output_token_ids)
            record = self.record(job, name, served.prompt_tokens, served.cached_tokens, served.ttft_ms)
            record.predicted_cached_tokens = prediction.cached_tokens
            record.first_divergence = prediction.common_prefix
            record.extra["attempts"] = attempt
            self.served[name].append(record)
            return record
        raise UserError(f"vllm-router did not answer request {job.index} in {PROXY_ATTEMPTS} attempts")

    def home_of(self, session: str) -> str | None:
        """The worker that served the session's latest request so far."""
        latest: tuple[int, str] | None = None
        for name, records in self.served.items():
            for r in records:
                if r.extra["session"] == session and (latest is None or r.index > latest[0]):
                    latest = (r.index, name)
        return latest[1] if latest else None

    async def attribute(self, before: dict[str, PrefixCounters], prompt_tokens: int, job: Job) -> str:
        """The worker whose prefix-cache query counter grew by exactly this request's prompt."""
        deadline = time.monotonic() + 5.0
        while True:
            grew = {}
            for n, counters in before.items():
                if n not in self.dead:  # a crashed worker served nothing (and has no /metrics)
                    grew[n] = (await self.clients[n].counters()).queries - counters.queries
            movers = [n for n, g in grew.items() if g]
            if len(movers) == 1 and grew[movers[0]] == prompt_tokens:
                return movers[0]
            if time.monotonic() >= deadline:
                raise UserError(
                    f"cannot tell which worker served request {job.index} through vllm-router: "
                    f"query counters grew by {grew}, the prompt has {prompt_tokens} tokens"
                )
            await asyncio.sleep(0.1)

    # bookkeeping

    def record(self, job: Job, worker: str, prompt: int, cached: int, ttft_ms: float) -> RequestRecord:
        extra: dict[str, Any] = {"session": job.session, "turn": job.turn, "worker": worker}
        if len(job.route) > 1:
            extra["retried_from"] = job.route[0]
        return RequestRecord(job.index, prompt, cached, 0, ttft_ms, 0, extra=extra)

    def expected_counters(self, name: str) -> PrefixCounters:
        records = self.served[name]
        start = self.counters_before[name]
        return PrefixCounters(
            start.queries + sum(r.prompt_tokens for r in records),
            start.hits + sum(r.cached_tokens for r in records),
        )

    async def execute(self) -> None:
        self.counters_before = {n: await c.counters() for n, c in self.clients.items()}
        try:
            async with asyncio.TaskGroup() as group:
                if self.proxy is not None:
                    group.create_task(self.serve_via_proxy())
                else:
                    for name in self.queues:
                        group.create_task(self.serve(name))
                await self.dispatch()
                await asyncio.gather(*(job.done for job in self.jobs))
                for queue in self.queues.values():
                    queue.put_nowait(None)  # every request answered: the serve loops may end
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        self.counters_after = {}
        for name, client in self.clients.items():
            if name in self.final_counters:
                self.counters_after[name] = self.final_counters[name]
            else:
                self.counters_after[name] = await client.settled_counters(self.expected_counters(name))

    def per_worker(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, records in self.served.items():
            delta = self.counters_after[name] - self.counters_before[name]
            prompt = sum(r.prompt_tokens for r in records)
            cached = sum(r.cached_tokens for r in records)
            out[name] = {
                "url": self.fleet.worker(name).url,
                "requests": len(records),
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
                "counter_queries": delta.queries,
                "counter_hits": delta.hits,
                "counters_agree": delta.queries == prompt and delta.hits == cached,
                "crashed": name in self.dead or name in self.final_counters,
            }
        return out


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first real error inside a task group's exception group (UserError preferred)."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, UserError):
            return leaf
    return leaves[0]


# --- the lesson --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    workers: int
    sessions: int
    turns: int
    seed: int
    think_s: float
    kill_at: int | None
    router: str
    quick: bool
    max_tokens: int
    with_random: bool
    salt_per_session: bool

    @property
    def requests(self) -> int:
        return self.sessions * self.turns


def settings_from(args: argparse.Namespace) -> Settings:
    """Validate the lesson's flags; every mistake is a one-line error before any work."""
    sessions = int(args.sessions or (QUICK_SESSIONS if args.quick else DEFAULT_SESSIONS))
    turns = int(args.turns or (QUICK_TURNS if args.quick else DEFAULT_TURNS))
    workers = len(parse_endpoints(args.endpoints)) if args.endpoints else int(args.workers)
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
    total = sessions * turns
    kill_at: int | None
    if args.kill_worker_at is None:  # default: a third of the way in, so moved sessions recover
        kill_at = None if args.endpoints else max(1, total // 3)
    else:
        kill_at = int(args.kill_worker_at) or None
        if kill_at is not None and not 1 <= kill_at < total:
            raise UserError(
                f"--kill-worker-at must be between 1 and {total - 1} (0: no failover run), got {kill_at}"
            )
        if kill_at is not None and args.endpoints:
            raise UserError(
                "--kill-worker-at needs workers this script started: it never stops servers it does not own"
            )
    return Settings(
        workers,
        sessions,
        turns,
        int(args.seed),
        args.think_ms / 1000.0,
        kill_at,
        args.router,
        bool(args.quick),
        int(args.max_tokens),
        with_random=bool(args.with_random),
        salt_per_session=args.cache_salt == "session",
    )


def plans(settings: Settings) -> list[RunPlan]:
    """The router runs, WRONG first. Each starts cold (its own cache_salt)."""
    if settings.router == "vllm-router":
        runs = [
            RunPlan(
                "wrong",
                "vllm-router --policy round_robin: request k to worker k mod N",
                "round_robin",
                "vllm-router",
            ),
            RunPlan(
                "right",
                "vllm-router --policy consistent_hash on the X-Session-ID header",
                "session",
                "vllm-router",
            ),
        ]
        if settings.with_random:
            runs.append(RunPlan("random", "vllm-router --policy random", "random", "vllm-router"))
    else:
        runs = [
            RunPlan(
                "wrong", "round robin: request k goes to worker k mod N, whatever its session", "round_robin"
            ),
            RunPlan("right", "consistent hash of session_id: each session stays on its worker", "session"),
        ]
        if settings.with_random:
            runs.append(RunPlan("random", "random worker per request (seeded)", "random"))
    if settings.kill_at is not None:
        by = "vllm-router --policy consistent_hash" if settings.router == "vllm-router" else "consistent hash"
        label = f"{by}; a worker crashes after {settings.kill_at} requests"
        runs.append(RunPlan("failover", label, "session", settings.router, settings.kill_at))
    return runs


@dataclass
class Workload:
    arrivals: list[Arrival]
    messages: list[list[Message]]  # per arrival
    prompts: list[list[int]]  # per arrival, as the servers tokenize it
    system_tokens: int
    shared_tokens: int  # the leading tokens every session's prompt has in common

    def own_hit_rate(self, records: Sequence[RequestRecord], block_size: int) -> float:
        """Hit rate on the tokens only the request's own session has (past the shared prefix).

        A worker caches the shared system prompt whatever the router does; this is the part
        where routing decides.
        """
        shared = block_size * (self.shared_tokens // block_size)
        own_prompt = sum(r.prompt_tokens - self.shared_tokens for r in records)
        own_cached = sum(max(0, r.cached_tokens - shared) for r in records)
        return own_cached / own_prompt if own_prompt else 0.0


async def build_workload(settings: Settings, client: AsyncWorkerClient) -> Workload:
    arrivals = arrival_schedule(settings.sessions, settings.turns, settings.seed, settings.think_s)
    per_session = {s: session_requests(s, settings.turns, settings.quick) for s in range(settings.sessions)}
    messages = [per_session[session_number(sid)][turn] for _, sid, turn in arrivals]
    prompts = await asyncio.gather(*(client.tokenize(m) for m in messages))
    system_only = await client.tokenize([{"role": "system", "content": system_prompt(settings.quick)}])
    shared = min(len(p) for p in prompts)
    for prompt in prompts:
        shared = common_prefix_len(prompts[0][:shared], prompt)
    return Workload(arrivals, messages, list(prompts), len(system_only), shared)


async def warm_up(clients: dict[str, AsyncWorkerClient]) -> None:
    """One short request per worker that shares nothing with the lesson's prompts."""
    prompt = [{"role": "user", "content": "Warm-up. Count from one to ten in French: un, deux, trois"}]
    await asyncio.gather(*(c.chat(prompt, "warm-up-" + secrets.token_hex(4), 4) for c in clients.values()))


async def run_plan(
    fleet: Fleet,
    clients: dict[str, AsyncWorkerClient],
    settings: Settings,
    workload: Workload,
    plan: RunPlan,
    on_done: Callable[[], None],
) -> RouterRun:
    names = [w.name for w in fleet.workers]
    salt = f"{plan.name}-{secrets.token_hex(6)}"  # a fresh namespace: this run starts cold
    salts = [f"{salt}-{sid}" if settings.salt_per_session else salt for _, sid, _ in workload.arrivals]
    expected = simulate(
        plan.policy,
        workload.arrivals,
        workload.prompts,
        names,
        fleet.block_size,
        settings.seed,
        salts,
        plan.kill_at,
    )
    loop = asyncio.get_running_loop()
    jobs = [
        Job(i, sid, turn, at, workload.messages[i], workload.prompts[i], salts[i], loop.create_future())
        for i, (at, sid, turn) in enumerate(workload.arrivals)
    ]
    start = time.perf_counter()
    if plan.via == "vllm-router":
        with VllmRouter(vllm_router_policy(plan), [w.url for w in fleet.workers]) as url:
            proxy = AsyncWorkerClient(url, fleet.model, unavailable_statuses=(500, 502, 503, 504))
            try:
                run = RoutedRun(
                    fleet, clients, plan, jobs, settings.max_tokens, settings.seed, on_done, proxy
                )
                await run.execute()
            finally:
                await proxy.close()
    else:
        run = RoutedRun(fleet, clients, plan, jobs, settings.max_tokens, settings.seed, on_done)
        await run.execute()
    wall_s = time.perf_counter() - start
    records = sorted((job.done.result() for job in jobs), key=lambda r: r.index)
    per_worker = run.per_worker()
    counters = PrefixCounters(
        sum(w["counter_queries"] for w in per_worker.values()),
        sum(w["counter_hits"] for w in per_worker.values()),
    )
    variant = VariantResult(plan.name, plan.label, records, counters)
    return RouterRun(plan, variant, expected, salt, per_worker, run.failover, wall_s)


async def run_lesson(fleet: Fleet, settings: Settings) -> tuple[Workload, list[RouterRun]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    clients = {w.name: AsyncWorkerClient(w.url, fleet.model) for w in fleet.workers}
    try:
        with console.status("tokenizing the sessions and warming up the workers ..."):
            workload = await build_workload(settings, clients[fleet.workers[0].name])
            await warm_up(clients)
        runs: list[RouterRun] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            for plan in plans(settings):
                task = progress.add_task(f"{plan.name.upper():>8} {plan.policy}", total=settings.requests)
                runs.append(
                    await run_plan(fleet, clients, settings, workload, plan, partial(progress.advance, task))
                )
        return workload, runs
    finally:
        for client in clients.values():
            await client.close()


# --- what the runs show ------------------------------------------------------------------------


def session_map(run: RouterRun) -> dict[str, list[str]]:
    """For each session, the worker of each of its turns (a retried turn: 'dead->new')."""
    out: dict[str, list[str]] = {}
    for r in sorted(
        run.variant.requests, key=lambda r: (session_number(r.extra["session"]), r.extra["turn"])
    ):
        where = r.extra["worker"]
        if "retried_from" in r.extra:
            where = f"{r.extra['retried_from']}->{where}"
        out.setdefault(r.extra["session"], []).append(where)
    return out


def hit_rate(records: Sequence[RequestRecord]) -> float | None:
    prompt = sum(r.prompt_tokens for r in records)
    return sum(r.cached_tokens for r in records) / prompt if prompt else None


def failover_report(run: RouterRun, workers: Sequence[str]) -> dict[str, Any]:
    """Which sessions moved, that only the dead worker's did, and the hit-rate dip and recovery."""
    failover = run.failover
    assert failover is not None
    records = run.variant.requests
    before = [r for r in records if r.index < failover.after_requests]
    after = [r for r in records if r.index >= failover.after_requests]
    if run.plan.via == "script":  # the script's ring: every session's worker and its next one
        ring = ConsistentHashRouter(workers)
        sessions = {r.extra["session"] for r in records}
        home = {s: ring.route(s) for s in sessions}
        next_home = {s: ring.preference_list(s)[1] for s in sessions}
    else:  # vllm-router's own ring: what it did before the crash, and where it went after
        home = {r.extra["session"]: r.extra["worker"] for r in before}
        next_home = {}
        for r in after:
            next_home.setdefault(r.extra["session"], r.extra["worker"])
    moved = sorted(
        {r.extra["session"] for r in after if home.get(r.extra["session"]) == failover.victim},
        key=session_number,
    )
    stayed = sorted({r.extra["session"] for r in after} - set(moved), key=session_number)
    first_after: dict[str, RequestRecord] = {}
    for r in after:
        first_after.setdefault(r.extra["session"], r)
    dip = [first_after[s] for s in moved]
    recovery = [r for r in after if r.extra["session"] in moved and r not in dip]
    return {
        "worker": failover.victim,
        "after_requests": failover.after_requests,
        "retried_requests": failover.retried,
        "queued_rerouted": failover.moved,
        "moved_sessions": {s: {"from": failover.victim, "to": next_home[s]} for s in moved},
        "moved_to_next_on_ring": all(
            r.extra["worker"] == next_home[r.extra["session"]] for r in after if r.extra["session"] in moved
        ),
        "other_sessions_kept_their_worker": all(
            r.extra["worker"] == home[r.extra["session"]]
            for r in after
            if r.extra["session"] in stayed and r.extra["session"] in home
        ),
        "requests": len(run.expected.workers),
        "requests_answered": len(records),
        "hit_rate_before": hit_rate(before),
        "hit_rate_moved_first_turn": hit_rate(dip),
        "hit_rate_moved_later_turns": hit_rate(recovery),
        "hit_rate_unmoved_after": hit_rate([r for r in after if r.extra["session"] in stayed]),
    }


def routing_json(run: RouterRun, fleet: Fleet, workload: Workload) -> dict[str, Any]:
    assignments = run.assignments()
    out: dict[str, Any] = {
        "router": run.plan.policy
        if run.plan.via == "script"
        else f"vllm-router:{vllm_router_policy(run.plan)}",
        "cache_salt": run.salt,
        "expected_hit_rate": round(run.expected.hit_rate, 4),
        "own_tokens_hit_rate": round(workload.own_hit_rate(run.variant.requests, fleet.block_size), 4),
        "expected_matches_measured": run.expected.cached == [r.cached_tokens for r in run.variant.requests],
        "sticky_fraction": round(sticky_fraction(assignments), 4),
        "any_seen_fraction": round(any_seen_fraction(assignments), 4),
        "wall_s": round(run.wall_s, 3),
        "per_worker": run.per_worker,
        "session_to_worker": session_map(run),
    }
    if run.failover is not None:
        out["failover"] = failover_report(run, [w.name for w in fleet.workers])
    return out


def build_result(
    fleet: Fleet, settings: Settings, workload: Workload, runs: list[RouterRun]
) -> ExampleResult:
    names = [w.name for w in fleet.workers]
    lengths = [len(p) for p in workload.prompts]
    salt_scope = "one per session (sessions share no block)" if settings.salt_per_session else "one per run"
    notes = [
        f"{settings.sessions} sessions x {settings.turns} turns on {len(names)} workers; arrivals seeded "
        f"(seed {settings.seed}, mean think {settings.think_s * 1000:.0f} ms); every run starts cold "
        "(fresh cache_salt) and routes the same arrival order",
        f"system prompt {workload.system_tokens} tokens, the same in every session; prompts "
        f"{min(lengths)}-{max(lengths)} tokens; cache_salt: {salt_scope}",
    ]
    if settings.router == "vllm-router":
        notes.append(
            "vllm-router picks the worker; one request at a time, so which one it picked is read from "
            "the workers' /metrics and predicted == engine stays exact"
        )
    else:
        notes.append(
            "each worker serves one request at a time (workers in parallel): predicted == engine is exact"
        )
    extra = {
        "workers": [
            {"name": w.name, "url": w.url, "started_here": w.process is not None} for w in fleet.workers
        ],
        "settings": {
            "sessions": settings.sessions,
            "turns": settings.turns,
            "seed": settings.seed,
            "think_ms": round(settings.think_s * 1000),
            "kill_worker_at": settings.kill_at,
            "router": settings.router,
        },
        "routing": {run.plan.name: routing_json(run, fleet, workload) for run in runs},
        "shared_prefix_tokens": workload.shared_tokens,
    }
    return ExampleResult(EXAMPLE, fleet.info, [run.variant for run in runs], notes=notes, extra=extra)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def routers_table(result: ExampleResult) -> Table:
    routing = result.extra["routing"]
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
    for v in result.variants:
        s, info = v.summary(), routing[v.name]
        load = " ".join(f"{w.replace('worker-', 'w')}:{d['requests']}" for w, d in info["per_worker"].items())
        counters = all(d["counters_agree"] for d in info["per_worker"].values())
        table.add_row(
            v.name.upper(),
            info["router"],
            f"{s['hit_rate']:.1%}",
            f"{info['expected_hit_rate']:.1%}",
            f"{info['own_tokens_hit_rate']:.1%}",
            f"{info['sticky_fraction']:.0%}",
            f"{s['ttft_ms_median']:,.0f}",
            f"{s['ttft_ms_p90']:,.0f}",
            load,
            _mark(counters and s["prediction_matches"]),
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


def session_table(result: ExampleResult) -> Table:
    routing = result.extra["routing"]
    table = Table(title="Where each session's turns went (worker per turn)", title_justify="left")
    table.add_column("session")
    for v in result.variants:
        table.add_column(v.name.upper())
    sessions = sorted(routing[result.variants[0].name]["session_to_worker"], key=session_number)
    for s in sessions:
        cells = []
        for v in result.variants:
            turns = routing[v.name]["session_to_worker"].get(s, [])
            text = " ".join(t.replace("worker-", "w") for t in turns)
            cells.append(f"[green]{text}[/]" if len(set(turns)) == 1 else escape(text))
        table.add_row(s, *cells)
    return table


def counters_table(result: ExampleResult) -> Table:
    table = Table(
        title="Per worker: per-request sums vs the worker's own /metrics counters (delta over the run)",
        title_justify="left",
    )
    for name in (
        "variant",
        "worker",
        "requests",
        "prompt tok",
        "cached (requests)",
        "queries (/metrics)",
        "hits (/metrics)",
        "hit rate",
        "agree",
    ):
        table.add_column(name, justify="left" if name in ("variant", "worker") else "right")
    for v in result.variants:
        for worker, d in result.extra["routing"][v.name]["per_worker"].items():
            table.add_row(
                v.name.upper(),
                worker + (" (crashed)" if d["crashed"] else ""),
                str(d["requests"]),
                f"{d['prompt_tokens']:,}",
                f"{d['cached_tokens']:,}",
                f"{d['counter_queries']:,}",
                f"{d['counter_hits']:,}",
                f"{d['hit_rate']:.0%}",
                "[green]yes[/]" if d["counters_agree"] else "[bold red]NO[/]",
            )
    return table


def failover_panel(report: dict[str, Any]) -> Panel:
    moved = ", ".join(f"{s} -> {m['to']}" for s, m in report["moved_sessions"].items()) or "none"
    lines = [
        f"{report['worker']} crashed (SIGKILL) after {report['after_requests']} requests, with request "
        f"{report['after_requests']} in flight.",
        f"failed on it and retried on another worker: requests {report['retried_requests']}; "
        f"queued for it and sent to their next worker instead: {report['queued_rerouted'] or 'none'}",
        f"sessions moved: {moved}",
        f"  each to its next worker on the ring: {_mark(report['moved_to_next_on_ring'])}   "
        f"every other session kept its worker: {_mark(report['other_sessions_kept_their_worker'])}",
        f"requests answered: {report['requests_answered']} of {report['requests']}",
        f"hit rate: before the crash {_pct(report['hit_rate_before'])}  |  moved sessions, first turn "
        f"after the move {_pct(report['hit_rate_moved_first_turn'])} (the dip: only the system prompt is "
        f"cached there)  ->  their later turns {_pct(report['hit_rate_moved_later_turns'])} (recovered)  |  "
        f"unmoved sessions {_pct(report['hit_rate_unmoved_after'])}",
    ]
    return Panel("\n".join(lines), title="Failover: a worker dies mid-run", title_align="left")


def _mark(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[bold red]NO[/]"


def show_details(result: ExampleResult) -> None:
    """The routing view of the run: per router, per session, per worker, and the failover."""
    console.print(routers_table(result))
    console.print(f"[dim]{ROUTERS_LEGEND}[/]")
    console.print(session_table(result))
    console.print(counters_table(result))
    all_agree = all(
        d["counters_agree"] for info in result.extra["routing"].values() for d in info["per_worker"].values()
    )
    console.print(
        "every worker's /metrics prefix-cache counters agree with the per-request sums: "
        + ("[green]yes[/]" if all_agree else "[bold red]NO[/]")
    )
    failover = result.extra["routing"].get("failover", {}).get("failover")
    if failover is not None:
        console.print(failover_panel(failover))


# --- entry points ------------------------------------------------------------------------------


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
        choices=["script", "vllm-router"],
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


def run(backend: Backend | None, args: argparse.Namespace) -> ExampleResult:
    """The lesson, as run_all_examples.py calls it. ``backend`` is not used: this lesson needs
    several workers, so it starts its own (or uses --endpoints)."""
    del backend
    settings = settings_from(args)
    with open_fleet(args) as fleet:
        workload, runs = asyncio.run(run_lesson(fleet, settings))
        return build_result(fleet, settings, workload, runs)


def main(argv: list[str] | None = None) -> int:
    parser = lesson_parser(__doc__)
    add_lesson_args(parser)
    args = parser.parse_args(argv)
    if args.endpoint:
        raise UserError("lesson 4 needs several workers: give them as --endpoints URL1,URL2")
    settings_from(args)  # bad input fails before any server starts
    json_path = check_json_target(args.json)
    if args.endpoints:  # unreachable servers fail here, before any work
        for url in parse_endpoints(args.endpoints):
            probe_endpoint(url)
    result = run(None, args)
    show(result, extra_columns=TABLE_COLUMNS)
    show_details(result)
    write_json(json_path, result.to_json())
    return 0


if __name__ == "__main__":
    exit_with(main)
