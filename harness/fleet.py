"""A fleet of vLLM workers, and sending one schedule of session turns through a router to them
while keeping every number exact.

Lesson 4 compares routers on real workers: local servers this program starts (and may crash,
for the failover run) or the user's own (``--endpoints``). ``dispatch`` sends a run's arrivals
through one router, to the workers, and returns what they reported: per request the worker, the
prompt tokens, the engine's cached tokens and the TTFT, next to the cached tokens predicted for
that worker's cache before the request went out (``measure.Recorder``, one per worker and
cache salt); per worker the delta of its ``/metrics`` prefix-cache counters.

Three rules keep every number exact:

* arrivals are routed in schedule order, a turn only once its session's previous reply is back
  (a user reads before answering), so every run routes the same sequence;
* each worker serves one request at a time, in the order they were routed to it. vLLM
  registers a prompt's blocks as cached when it *schedules* them, so a request that joins while
  another is mid-prefill may find some of its blocks or not, depending on which engine step it
  is admitted in. One at a time per worker, the cache model knows the worker's exact cache
  state when each request starts; the workers still run in parallel;
* a request that fails because its worker died is retried on the session's next worker, and so
  are the requests queued for the dead worker: none is lost.

Who picks the worker is the one thing that differs: this program's router (``harness.routing``)
before the request is sent, or ``vllm-router`` in front of the workers, which picks as it
forwards; then the workers' own query counters say which one served it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from harness.api_key import NO_API_KEY, ApiKey
from harness.backend import WARMUP_PROMPT, EngineInfo, Message, PrefixCounters, Reply
from harness.console import console
from harness.engine import EngineOptions
from harness.errors import UserError
from harness.measure import Pending, RequestRecord
from harness.routing import ConsistentHashRouter, NoWorkersError, Router, make_router, session_number
from harness.routing_sim import WorkerCaches, Workload
from harness.servers import LocalServers, ServerProcess
from harness.workers import (
    AsyncWorkerClient,
    EndpointInfo,
    VllmRouter,
    Worker,
    WorkerUnavailable,
    crash,
    probe_endpoint,
)

ROUTED_BY = ("script", "vllm-router")
# Through vllm-router, a request whose worker died is retried by the client (ProxyDispatcher).
PROXY_ATTEMPTS, PROXY_RETRY_S = 20, 0.25
PROXY_LANE = "vllm-router"


# --- the workers -------------------------------------------------------------------------------


@dataclass
class Fleet:
    workers: list[Worker]
    model: str  # the name the servers serve it under
    block_size: int
    info: EngineInfo
    owned: bool  # started here (so the failover run may crash one)
    num_gpu_blocks: int | None = None  # the smallest worker's KV cache, as its /metrics says
    api_key: ApiKey = NO_API_KEY  # the workers' key (one for all), sent with every request

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.workers]

    def worker(self, name: str) -> Worker:
        return next(w for w in self.workers if w.name == name)


def parse_endpoints(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if len(urls) < 2:
        raise UserError(f"--endpoints needs at least two comma-separated URLs, got {text!r}")
    if len(set(urls)) != len(urls):
        raise UserError(f"--endpoints names the same URL twice: {text}")
    return urls


def fleet_from_endpoints(urls: Sequence[str], api_key: ApiKey = NO_API_KEY) -> Fleet:
    """Existing servers (any machines), all taking ``api_key``. All are checked before any work
    starts."""
    infos = [probe_endpoint(u, api_key=api_key) for u in urls]
    if len({i.model for i in infos}) > 1 or len({i.block_size for i in infos}) > 1:
        seen = ", ".join(f"{u}: {i.model} (block {i.block_size})" for u, i in zip(urls, infos, strict=True))
        raise UserError(f"--endpoints must serve the same model with the same block size: {seen}")
    workers = [Worker(f"worker-{i}", u.rstrip("/").removesuffix("/v1")) for i, u in enumerate(urls)]
    first = infos[0]
    info = EngineInfo(
        "vllm-server", first.model, "remote", first.block_size, first.vllm_version, ",".join(urls)
    )
    return Fleet(workers, first.model, first.block_size, info, False, _smallest_cache(infos), api_key)


def fleet_from_servers(servers: Sequence[ServerProcess], display_name: str, device: str) -> Fleet:
    """Servers this program started (``harness.servers.LocalServers``, all with the same key or
    none): it may crash one."""
    api_key = servers[0].credentials
    infos = [probe_endpoint(s.url, api_key=api_key) for s in servers]
    workers = [Worker(s.name, s.url, s.process) for s in servers]
    urls = ",".join(w.url for w in workers)
    first = infos[0]
    engine = EngineInfo("vllm-server", display_name, device, first.block_size, first.vllm_version, urls)
    return Fleet(workers, first.model, first.block_size, engine, True, _smallest_cache(infos), api_key)


def _smallest_cache(infos: Sequence[EndpointInfo]) -> int | None:
    sizes = [i.num_gpu_blocks for i in infos]
    return min(s for s in sizes if s is not None) if None not in sizes else None


@contextlib.contextmanager
def remote_fleet(urls: Sequence[str], api_key: ApiKey = NO_API_KEY) -> Iterator[Fleet]:
    """The servers named by ``--endpoints``: used, never stopped."""
    yield fleet_from_endpoints(urls, api_key)


@contextlib.contextmanager
def local_fleet(opts: EngineOptions, display_name: str, count: int) -> Iterator[Fleet]:
    """``count`` local vLLM servers, each on its own cores, started here and always stopped."""
    with (
        console.status(
            f"starting {count} vLLM workers with {display_name} (1-2 minutes on CPU) ..."
        ) as status,
        LocalServers(opts, count=count, on_status=lambda msg: status.update(msg)) as servers,
    ):
        yield fleet_from_servers(servers, display_name, opts.resolved_device())


async def warm_up(clients: dict[str, AsyncWorkerClient]) -> None:
    """One short request per worker that shares nothing with any lesson's prompts."""
    prompt: list[Message] = [{"role": "user", "content": WARMUP_PROMPT}]
    await asyncio.gather(*(c.chat(prompt, "warm-up-" + secrets.token_hex(4), 4) for c in clients.values()))


# --- one run through one router ----------------------------------------------------------------


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
class WorkerTally:
    """One worker over one run: the sums of its requests next to its own counters' delta."""

    name: str
    url: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    counters: PrefixCounters  # delta of its /metrics prefix-cache counters over the run
    crashed: bool

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def counters_agree(self) -> bool:
        return self.counters.queries == self.prompt_tokens and self.counters.hits == self.cached_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_rate": round(self.hit_rate, 4),
            "counter_queries": self.counters.queries,
            "counter_hits": self.counters.hits,
            "counters_agree": self.counters_agree,
            "crashed": self.crashed,
        }


@dataclass
class Dispatched:
    """What the workers reported for one run."""

    records: list[RequestRecord]  # by arrival index
    tallies: list[WorkerTally]
    failover: Failover | None
    wall_s: float

    @property
    def counters(self) -> PrefixCounters:
        return PrefixCounters(
            sum(t.counters.queries for t in self.tallies), sum(t.counters.hits for t in self.tallies)
        )


async def dispatch(
    fleet: Fleet,
    clients: dict[str, AsyncWorkerClient],
    workload: Workload,
    salts: Sequence[str],
    policy: str,
    routed_by: str,
    *,
    seed: int,
    max_tokens: int,
    kill_at: int | None,
    on_done: Callable[[RequestRecord], None],
) -> Dispatched:
    """Send ``workload``'s arrivals through router ``policy`` (this program's, or vllm-router's:
    ``routed_by``) and keep what the workers report. ``kill_at``: crash a worker with that
    request in flight (workers this program started only)."""
    loop = asyncio.get_running_loop()
    jobs = [
        Job(i, sid, turn, at, workload.messages[i], workload.prompts[i], salts[i], loop.create_future())
        for i, (at, sid, turn) in enumerate(workload.arrivals)
    ]
    start = time.perf_counter()
    dispatcher: Dispatcher
    if routed_by == "vllm-router":
        workers = [w.url for w in fleet.workers]
        with VllmRouter(vllm_router_policy(policy), workers, api_key=fleet.api_key) as url:
            proxy = AsyncWorkerClient(
                url, fleet.model, unavailable_statuses=(500, 502, 503, 504), api_key=fleet.api_key
            )
            try:
                dispatcher = ProxyDispatcher(fleet, clients, jobs, max_tokens, kill_at, on_done, proxy)
                await dispatcher.execute()
            finally:
                await proxy.close()
    else:
        router = make_router(policy, fleet.names, seed, fleet.block_size)
        dispatcher = DirectDispatcher(fleet, clients, jobs, max_tokens, kill_at, on_done, router)
        await dispatcher.execute()
    records = sorted((job.done.result() for job in jobs), key=lambda r: r.index)
    return Dispatched(records, dispatcher.tallies(), dispatcher.failover, time.perf_counter() - start)


def vllm_router_policy(policy: str) -> str:
    """vllm-router's name for one of ``harness.routing``'s policies."""
    return "consistent_hash" if policy == "session" else policy


class Dispatcher:
    """The rules every run follows, whoever picks the worker (see the module docstring).

    A *lane* is a queue served one request at a time: one per worker when this program routes,
    one in front of vllm-router when it does. Subclasses say which lane a job joins
    (``lane_for``) and how it is sent (``send``).
    """

    def __init__(
        self,
        fleet: Fleet,
        clients: dict[str, AsyncWorkerClient],
        jobs: list[Job],
        max_tokens: int,
        kill_at: int | None,
        on_done: Callable[[RequestRecord], None],
        lanes: Sequence[str],
    ) -> None:
        self.fleet = fleet
        self.clients = clients
        self.jobs = jobs
        self.max_tokens = max_tokens
        self.kill_at = kill_at
        self.on_done = on_done
        self.caches = WorkerCaches(fleet.block_size)
        self.queues: dict[str, asyncio.Queue[Job | None]] = {lane: asyncio.Queue() for lane in lanes}
        self.served: dict[str, list[RequestRecord]] = {n: [] for n in fleet.names}
        self.final_counters: dict[str, PrefixCounters] = {}  # a crashed worker's last readable counters
        self.counters_before: dict[str, PrefixCounters] = {}
        self.counters_after: dict[str, PrefixCounters] = {}
        self.failover: Failover | None = None
        self.dead: set[str] = set()

    def lane_for(self, job: Job) -> str:
        raise NotImplementedError

    async def send(self, lane: str, job: Job) -> RequestRecord | None:
        """The job's record; None when the lane's worker died and its jobs went elsewhere."""
        raise NotImplementedError

    async def dispatch(self) -> None:
        """The router's decisions, in arrival order."""
        start = time.monotonic()
        previous: dict[str, Job] = {}
        for job in self.jobs:
            delay = job.at_s - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if job.session in previous:
                await previous[job.session].done
            lane = self.lane_for(job)
            job.route.append(lane)
            self.queues[lane].put_nowait(job)
            previous[job.session] = job

    async def serve(self, lane: str) -> None:
        """One lane, one request at a time."""
        queue = self.queues[lane]
        while (job := await queue.get()) is not None:
            record = await self.send(lane, job)
            if record is None:
                return
            job.done.set_result(record)
            self.on_done(record)

    def finish(self, worker: str, job: Job, pending: Pending, reply: Reply, **extra: Any) -> RequestRecord:
        """The measuring step's second half: the worker's answer next to the prediction."""
        fields: dict[str, Any] = {"session": job.session, "turn": job.turn, "worker": worker}
        if len(job.route) > 1:
            fields["retried_from"] = job.route[0]
        record = self.caches.recorder(worker, job.salt).record(pending, reply, {**fields, **extra})
        self.served[worker].append(record)
        return record

    async def crash(self, name: str, job: Job) -> None:
        process = self.fleet.worker(name).process
        if process is None:
            raise UserError("the failover run needs workers started by this script")
        await asyncio.to_thread(crash, process)
        self.failover = Failover(name, job.index, [], [])
        self.dead.add(name)

    async def crash_during(self, victim: str, job: Job) -> Callable[[], Any] | None:
        """When ``job`` is the one to crash a worker under: the victim's last counters (everything
        it served so far), and the crash to run once the request is in flight (accepted, no token
        back yet)."""
        if job.index != self.kill_at or self.failover is not None:
            return None
        self.final_counters[victim] = await self.clients[victim].settled_counters(
            self.expected_counters(victim)
        )
        return partial(self.crash, victim, job)

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
                for lane in self.queues:
                    group.create_task(self.serve(lane))
                await self.dispatch()
                await asyncio.gather(*(job.done for job in self.jobs))
                for queue in self.queues.values():
                    queue.put_nowait(None)  # every request answered: the serve loops may end
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        for name, client in self.clients.items():
            if name in self.final_counters:
                self.counters_after[name] = self.final_counters[name]
            else:
                self.counters_after[name] = await client.settled_counters(self.expected_counters(name))

    def tallies(self) -> list[WorkerTally]:
        return [
            WorkerTally(
                name,
                self.fleet.worker(name).url,
                len(records),
                sum(r.prompt_tokens for r in records),
                sum(r.cached_tokens for r in records),
                self.counters_after[name] - self.counters_before[name],
                name in self.dead or name in self.final_counters,
            )
            for name, records in self.served.items()
        ]


class DirectDispatcher(Dispatcher):
    """This program's router picks each request's worker before it is sent."""

    def __init__(
        self,
        fleet: Fleet,
        clients: dict[str, AsyncWorkerClient],
        jobs: list[Job],
        max_tokens: int,
        kill_at: int | None,
        on_done: Callable[[RequestRecord], None],
        router: Router,
    ) -> None:
        super().__init__(fleet, clients, jobs, max_tokens, kill_at, on_done, fleet.names)
        self.router = router

    def lane_for(self, job: Job) -> str:
        return self.router.route(job.session, job.index, job.prompt_ids, job.salt)

    async def send(self, lane: str, job: Job) -> RequestRecord | None:
        pending = self.caches.recorder(lane, job.salt).predict(job.index, job.prompt_ids)  # before it answers
        on_accepted = await self.crash_during(lane, job)
        try:
            reply = await self.clients[lane].chat(
                job.messages, job.salt, self.max_tokens, on_accepted=on_accepted
            )
        except WorkerUnavailable as exc:
            await self.fail_over(lane, job, exc)
            return None
        return self.finish(lane, job, pending, reply)

    async def fail_over(self, name: str, job: Job, exc: Exception) -> None:
        """The worker is gone: take it off the router and send its requests to their next worker."""
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
                worker = self.lane_for(moved)
                moved.route.append(worker)
                self.queues[worker].put_nowait(moved)
        except NoWorkersError as err:
            raise UserError("every worker has failed: no request can be answered") from err


class ProxyDispatcher(Dispatcher):
    """vllm-router picks the worker as it forwards; the workers' counters say which one it was.

    One request at a time in front of it, so exactly one worker's query counter grows by
    exactly the request's prompt. The prediction is made for every worker it may pick, before
    anything is sent.
    """

    def __init__(
        self,
        fleet: Fleet,
        clients: dict[str, AsyncWorkerClient],
        jobs: list[Job],
        max_tokens: int,
        kill_at: int | None,
        on_done: Callable[[RequestRecord], None],
        proxy: AsyncWorkerClient,
    ) -> None:
        super().__init__(fleet, clients, jobs, max_tokens, kill_at, on_done, [PROXY_LANE])
        self.proxy = proxy

    def lane_for(self, job: Job) -> str:
        return PROXY_LANE

    async def send(self, lane: str, job: Job) -> RequestRecord | None:
        """Send through vllm-router until answered. After a worker dies, vllm-router keeps
        hashing its sessions to it (answering HTTP 500 once its own retries fail) until its
        circuit breaker opens and it rebuilds the ring without it; the client retries meanwhile."""
        for attempt in range(1, PROXY_ATTEMPTS + 1):
            live = [n for n in self.fleet.names if n not in self.dead]
            pending = {n: self.caches.recorder(n, job.salt).predict(job.index, job.prompt_ids) for n in live}
            before = {n: await self.clients[n].counters() for n in live}
            on_accepted = await self.crash_during(self.home_of(job.session) or live[-1], job)
            try:
                reply = await self.proxy.chat(
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
            worker = await self.attribute(before, reply.prompt_tokens, job)
            job.route[-1] = worker
            return self.finish(worker, job, pending[worker], reply, attempts=attempt)
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


# --- after a failover: who moved, and what it cost ---------------------------------------------


@dataclass(frozen=True)
class FailoverReport:
    """Which sessions moved, that only the dead worker's did, and the hit-rate dip and recovery."""

    failover: Failover
    moved_sessions: dict[str, str]  # session -> the worker it moved to
    moved_to_next_on_ring: bool
    other_sessions_kept_their_worker: bool
    requests: int
    requests_answered: int
    hit_rate_before: float | None
    hit_rate_moved_first_turn: float | None
    hit_rate_moved_later_turns: float | None
    hit_rate_unmoved_after: float | None

    def to_json(self) -> dict[str, Any]:
        f = self.failover
        return {
            "worker": f.victim,
            "after_requests": f.after_requests,
            "retried_requests": f.retried,
            "queued_rerouted": f.moved,
            "moved_sessions": {s: {"from": f.victim, "to": to} for s, to in self.moved_sessions.items()},
            "moved_to_next_on_ring": self.moved_to_next_on_ring,
            "other_sessions_kept_their_worker": self.other_sessions_kept_their_worker,
            "requests": self.requests,
            "requests_answered": self.requests_answered,
            "hit_rate_before": self.hit_rate_before,
            "hit_rate_moved_first_turn": self.hit_rate_moved_first_turn,
            "hit_rate_moved_later_turns": self.hit_rate_moved_later_turns,
            "hit_rate_unmoved_after": self.hit_rate_unmoved_after,
        }


def hit_rate(records: Sequence[RequestRecord]) -> float | None:
    prompt = sum(r.prompt_tokens for r in records)
    return sum(r.cached_tokens for r in records) / prompt if prompt else None


def failover_report(
    failover: Failover,
    records: Sequence[RequestRecord],
    workers: Sequence[str],
    routed_by: str,
    requests: int,
) -> FailoverReport:
    """What a failover run shows. Through this program's ring, every session's worker and its
    next one are known in advance; through vllm-router's own ring, they are read off the run."""
    before = [r for r in records if r.index < failover.after_requests]
    after = [r for r in records if r.index >= failover.after_requests]
    if routed_by == "script":
        ring = ConsistentHashRouter(workers)
        sessions = {r.extra["session"] for r in records}
        home = {s: ring.route(s) for s in sessions}
        next_home = {s: ring.preference_list(s)[1] for s in sessions}
    else:
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
    return FailoverReport(
        failover=failover,
        moved_sessions={s: next_home[s] for s in moved},
        moved_to_next_on_ring=all(
            r.extra["worker"] == next_home[r.extra["session"]] for r in after if r.extra["session"] in moved
        ),
        other_sessions_kept_their_worker=all(
            r.extra["worker"] == home[r.extra["session"]]
            for r in after
            if r.extra["session"] in stayed and r.extra["session"] in home
        ),
        requests=requests,
        requests_answered=len(records),
        hit_rate_before=hit_rate(before),
        hit_rate_moved_first_turn=hit_rate(dip),
        hit_rate_moved_later_turns=hit_rate(recovery),
        hit_rate_unmoved_after=hit_rate([r for r in after if r.extra["session"] in stayed]),
    )
