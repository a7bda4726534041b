"""What a router *should* give, worked out from token IDs alone: a replay of routed sessions
through one cache model per worker.

Lesson 4 uses it twice.

Before every real run, ``simulate`` routes the run's arrivals with a fresh router and replays
them through the workers' caches, request by request, with the same measuring step the real
run uses (``measure.Recorder``: predict, then record). The real run sends the requests in this
very order and each worker serves its own one at a time, so what it predicts is what the
engines then report, token for token (the lesson checks it on every run).

Then, because it is exact where it can be checked, it answers what two workers cannot show:
what routing does with 8 to 64 workers, as production runs them. ``scaling_study`` replays the
same sessions over N = 2, 4, 8, 16, 32 workers under every router of ``harness.routing``, each
worker with a KV cache of bounded size that evicts the way vLLM does (``harness.block_pool``),
and reports per N and router: the hit rate on the sessions' own tokens, the prompt tokens the
workers had to compute (prefill), and the busiest worker's share of the requests. Every such
row is a simulation and says so (``simulated: true``); the N that ran for real is replayed
too, with caches as large as the real workers', and must equal what they measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.backend import Message, Reply
from harness.block_pool import BlockPool
from harness.measure import Recorder
from harness.prefix import CacheModel, PrefixCacheModel, common_prefix_len
from harness.routing import (
    DEFAULT_BALANCE_FACTOR,
    ROUTER_NAMES,
    Arrival,
    busiest_share,
    make_router,
)

SCALING_WORKERS: tuple[int, ...] = (2, 4, 8, 16, 32)
SCALING_ROUTERS: tuple[str, ...] = ROUTER_NAMES


@dataclass(frozen=True)
class Workload:
    """The sessions' requests in arrival order, as the workers tokenize them."""

    arrivals: list[Arrival]
    messages: list[list[Message]]  # per arrival
    prompts: list[list[int]]  # per arrival
    system_tokens: int
    shared_tokens: int  # the leading tokens every prompt has in common

    def own_tokens_hit_rate(
        self, prompt_tokens: Sequence[int], cached_tokens: Sequence[int], block_size: int
    ) -> float:
        """Hit rate on the tokens only the request's own session has (past the shared prefix).

        A worker caches the shared system prompt whatever the router does; this is the part
        where routing decides.
        """
        shared = block_size * (self.shared_tokens // block_size)
        own_prompt = sum(p - self.shared_tokens for p in prompt_tokens)
        own_cached = sum(max(0, c - shared) for c in cached_tokens)
        return own_cached / own_prompt if own_prompt else 0.0


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``prompts`` share."""
    if not prompts:
        return 0
    shared = min(len(p) for p in prompts)
    for prompt in prompts:
        shared = common_prefix_len(prompts[0][:shared], prompt)
    return shared


def run_salts(arrivals: Sequence[Arrival], run_salt: str, per_session: bool) -> list[str]:
    """Each arrival's ``cache_salt``: the run's (sessions share blocks), or the run's and its
    session's (sessions share nothing)."""
    return [f"{run_salt}-{sid}" if per_session else run_salt for _, sid, _ in arrivals]


def worker_names(count: int) -> list[str]:
    """The names the lesson's workers have (what a ring hashes), for a fleet of ``count``."""
    return [f"worker-{i}" for i in range(count)]


class WorkerCaches:
    """What each worker's prefix cache holds, with one ``measure.Recorder`` per (worker, salt).

    Unbounded (``blocks_per_worker`` None): one ``PrefixCacheModel`` per (worker, cache_salt);
    vLLM mixes the salt into the first block's hash, so prompts under different salts share
    nothing, however many tokens they have in common. Bounded: one ``BlockPool`` per worker,
    the salts namespaces inside it, competing for the same blocks as on a real worker.
    """

    def __init__(self, block_size: int, blocks_per_worker: int | None = None) -> None:
        self.block_size = block_size
        self.blocks_per_worker = blocks_per_worker
        self._pools: dict[str, BlockPool] = {}
        self._recorders: dict[tuple[str, str], Recorder] = {}

    def _cache(self, worker: str, salt: str) -> CacheModel:
        if self.blocks_per_worker is None:
            return PrefixCacheModel(self.block_size)
        if worker not in self._pools:
            self._pools[worker] = BlockPool(self.block_size, self.blocks_per_worker)
        return self._pools[worker].namespace(salt)

    def recorder(self, worker: str, salt: str) -> Recorder:
        """The measuring step for requests to ``worker`` under ``salt``. No tokenizer is at hand
        (the workers tokenize), so divergences carry token positions but no text."""
        key = (worker, salt)
        if key not in self._recorders:
            self._recorders[key] = Recorder(self._cache(worker, salt), None)
        return self._recorders[key]

    @property
    def evicted_blocks(self) -> int:
        return sum(pool.evicted_blocks for pool in self._pools.values())


@dataclass(frozen=True)
class Expected:
    """A router's run as the simulation predicts it, per arrival."""

    workers: list[str]  # where each arrival goes, in arrival order
    cached: list[int]  # the cached tokens predicted there
    prompt_tokens: int
    evicted_blocks: int = 0

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
    blocks_per_worker: int | None = None,
    balance_factor: float = DEFAULT_BALANCE_FACTOR,
) -> Expected:
    """Route the arrivals with a fresh router and replay them through each worker's cache.

    ``kill_at``: the worker request ``kill_at`` is routed to dies with it in flight; the request
    and every later one are routed among the others (the real failover run also re-routes the
    requests already queued for the dead worker; this assumes they reach their new worker in
    arrival order). ``blocks_per_worker``: bounded caches (``WorkerCaches``).
    """
    router = make_router(policy, workers, seed, block_size, balance_factor)
    caches = WorkerCaches(block_size, blocks_per_worker)
    chosen, cached = [], []
    for index, ((_, sid, _), prompt, salt) in enumerate(zip(arrivals, prompts, salts, strict=True)):
        worker = router.route(sid, index, prompt, salt)
        if index == kill_at:
            router.remove_worker(worker)
            worker = router.route(sid, index, prompt, salt)
        recorder = caches.recorder(worker, salt)
        pending = recorder.predict(index, prompt)
        # No engine here: the reply is the model's own prediction, recorded like an answer.
        cached_tokens = pending.prediction.cached_tokens
        recorder.record(pending, Reply(len(prompt), cached_tokens, 0.0, None, None, ""))
        chosen.append(worker)
        cached.append(cached_tokens)
    return Expected(chosen, cached, sum(len(p) for p in prompts), caches.evicted_blocks)


# --- the same sessions at production scale ------------------------------------------------------


@dataclass(frozen=True)
class ScalingRow:
    """One router on N workers: measured on real workers, or simulated."""

    workers: int
    router: str
    simulated: bool
    cache_blocks: int | None  # each worker's KV blocks (None: unbounded)
    requests: int
    prompt_tokens: int
    cached_tokens: int
    own_tokens_hit_rate: float
    max_worker_share: float
    evicted_blocks: int | None  # None: not known (a real worker does not report it)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the workers computed rather than read from their caches."""
        return self.prompt_tokens - self.cached_tokens

    def same_figures(self, other: ScalingRow) -> bool:
        """Equal on everything a real run measures (what validates a simulation against it)."""
        return (
            self.workers,
            self.requests,
            self.prompt_tokens,
            self.cached_tokens,
            self.own_tokens_hit_rate,
            self.max_worker_share,
        ) == (
            other.workers,
            other.requests,
            other.prompt_tokens,
            other.cached_tokens,
            other.own_tokens_hit_rate,
            other.max_worker_share,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "router": self.router,
            "simulated": self.simulated,
            "cache_blocks": self.cache_blocks,
            "own_tokens_hit_rate": round(self.own_tokens_hit_rate, 4),
            "hit_rate": round(self.hit_rate, 4),
            "prefill_tokens": self.prefill_tokens,
            "max_worker_share": round(self.max_worker_share, 4),
            "requests": self.requests,
            "evicted_blocks": self.evicted_blocks,
        }


def scaling_row(
    workload: Workload,
    block_size: int,
    router: str,
    workers: int,
    chosen: Sequence[str],
    prompt_tokens: Sequence[int],
    cached_tokens: Sequence[int],
    *,
    simulated: bool,
    cache_blocks: int | None,
    evicted_blocks: int | None,
) -> ScalingRow:
    """The row of one run, simulated or measured: the same arithmetic for both."""
    return ScalingRow(
        workers=workers,
        router=router,
        simulated=simulated,
        cache_blocks=cache_blocks,
        requests=len(chosen),
        prompt_tokens=sum(prompt_tokens),
        cached_tokens=sum(cached_tokens),
        own_tokens_hit_rate=workload.own_tokens_hit_rate(prompt_tokens, cached_tokens, block_size),
        max_worker_share=busiest_share(chosen),
        evicted_blocks=evicted_blocks,
    )


def simulated_row(
    workload: Workload,
    salts: Sequence[str],
    block_size: int,
    seed: int,
    router: str,
    workers: int,
    cache_blocks: int | None,
    balance_factor: float = DEFAULT_BALANCE_FACTOR,
) -> ScalingRow:
    expected = simulate(
        router,
        workload.arrivals,
        workload.prompts,
        worker_names(workers),
        block_size,
        seed,
        salts,
        blocks_per_worker=cache_blocks,
        balance_factor=balance_factor,
    )
    return scaling_row(
        workload,
        block_size,
        router,
        workers,
        expected.workers,
        [len(p) for p in workload.prompts],
        expected.cached,
        simulated=True,
        cache_blocks=cache_blocks,
        evicted_blocks=expected.evicted_blocks if cache_blocks is not None else 0,
    )


def scaling_study(
    workload: Workload,
    salts: Sequence[str],
    block_size: int,
    seed: int,
    cache_blocks: int | None,
    worker_counts: Sequence[int] = SCALING_WORKERS,
    routers: Sequence[str] = SCALING_ROUTERS,
    balance_factor: float = DEFAULT_BALANCE_FACTOR,
) -> list[ScalingRow]:
    """Every router on every worker count, each from cold caches of ``cache_blocks`` blocks."""
    return [
        simulated_row(workload, salts, block_size, seed, router, n, cache_blocks, balance_factor)
        for n in worker_counts
        for router in routers
    ]


def blocks_needed(prompts: Sequence[Sequence[int]], block_size: int) -> int:
    """The KV blocks the longest prompt needs: a worker with fewer cannot serve it at all."""
    return max((-(-len(p) // block_size) for p in prompts), default=0)
