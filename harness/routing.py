"""Request routing across several engine workers, and why it decides prefix-cache reuse.

Every vLLM worker keeps its *own* prefix cache. A multi-turn conversation (a "session") only
reuses its prefix if turn ``t + 1`` lands on a worker that already computed turn ``t``. So a
router that spreads the requests of one session over several workers makes each of them see
fragments, and every fragment recomputes the prefix from the first token the worker has not
seen. Sending every request of a session to the same worker is called *session affinity*.

Production routers do exactly this:

* vLLM production-stack's router, ``--routing-logic session`` (with ``--session-key`` naming
  the request header that carries the session id), hashes that id onto its endpoints; requests
  without the header go to the least-busy endpoint.
* ``vllm-router`` (PyPI, the Rust load balancer), ``--policy consistent_hash``, hashes the
  ``X-Session-ID`` header on a ring, so a session stays on one worker and a worker that leaves
  only moves its own sessions. ``--policy round_robin`` rotates per request instead.
* OpenAI's API routes a request by a hash of its prompt's first tokens; ``prompt_cache_key``
  adds a caller-chosen key to that hash, so requests sharing a key (a session, a user, a tenant)
  go to the same machines and find the prefix those machines cached.
* SGLang's router (``--policy cache_aware``) and llm-d's scheduler (its prefix-cache scorer)
  look at the request's tokens instead: they send it where the longest prefix of them is
  cached, unless that worker is too busy compared with the others.

This module holds the policies lesson 4 compares, behind one small interface (``Router``):

* ``RoundRobinRouter`` and ``RandomRouter`` ignore the session (WRONG);
* ``ConsistentHashRouter`` hashes the session id on a ring with virtual nodes (RIGHT);
* ``BoundedLoadHashRouter``: the ring, but no worker takes more than its fair share of the
  sessions times a balance factor (a few sessions can land unevenly on a plain ring);
* ``PrefixAwareRouter``: the longest cached prefix wins, within the same load bound.

plus the arithmetic the lesson prints next to what the engines measured (``sticky_fraction``,
``any_seen_fraction``) and a seeded arrival process for the sessions (``arrival_schedule``).
Nothing here talks to an engine.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Protocol, runtime_checkable

from harness.prefix import PrefixCacheModel

ROUTER_NAMES: tuple[str, ...] = ("round_robin", "random", "session", "session_bounded", "prefix_aware")
# A worker may take this many times its fair share of the sessions (Mirrokni et al. use 1 + eps
# with eps around 0.25; HAProxy's hash-balance-factor 125 is the same bound).
DEFAULT_BALANCE_FACTOR = 1.25


class NoWorkersError(RuntimeError):
    """Every worker has been removed: there is nowhere left to send a request."""


@runtime_checkable
class Router(Protocol):
    """Picks the worker (an id such as a base URL) that serves one request of one session.

    ``prompt`` (the request's token IDs) and ``salt`` (its cache namespace) are there for the
    routers that look at what each worker has cached; the others ignore them.
    """

    name: str

    @property
    def workers(self) -> list[str]:
        """The live workers, in the order they were added."""
        ...

    def route(self, session_id: str, request_index: int, prompt: Sequence[int] = (), salt: str = "") -> str:
        """The worker for request number ``request_index`` (global order) of ``session_id``."""
        ...

    def remove_worker(self, worker: str) -> None: ...

    def add_worker(self, worker: str) -> None: ...


class _WorkerPool:
    """The live-worker bookkeeping every policy shares: unique ids, clear errors."""

    def __init__(self, workers: Iterable[str]) -> None:
        self._workers: list[str] = []
        for worker in workers:
            self.add_worker(worker)
        if not self._workers:
            raise ValueError("a router needs at least one worker")

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def add_worker(self, worker: str) -> None:
        if not worker:
            raise ValueError("a worker id must be a non-empty string")
        if worker in self._workers:
            raise ValueError(f"worker {worker!r} is already routed to")
        self._workers.append(worker)

    def remove_worker(self, worker: str) -> None:
        if worker not in self._workers:
            raise ValueError(f"worker {worker!r} is not routed to (live: {self._workers})")
        self._workers.remove(worker)

    def _require_workers(self) -> list[str]:
        if not self._workers:
            raise NoWorkersError("no live workers left to route to")
        return self._workers


class RoundRobinRouter(_WorkerPool):
    """WRONG for caching: request k goes to worker k mod N, whoever sent it.

    The counter is the router's own, like a real load balancer's: it counts requests the
    router has seen, so a retry after a failure also moves on to the next worker.
    """

    name = "round_robin"

    def __init__(self, workers: Iterable[str]) -> None:
        super().__init__(workers)
        self._next = 0

    def route(self, session_id: str, request_index: int, prompt: Sequence[int] = (), salt: str = "") -> str:
        workers = self._require_workers()
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


class RandomRouter(_WorkerPool):
    """WRONG for caching: a uniformly random worker per request (seeded, so runs repeat)."""

    name = "random"

    def __init__(self, workers: Iterable[str], seed: int = 0) -> None:
        super().__init__(workers)
        self._rng = random.Random(seed)

    def route(self, session_id: str, request_index: int, prompt: Sequence[int] = (), salt: str = "") -> str:
        return self._rng.choice(self._require_workers())


def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process, on every machine.

    Python's ``hash()`` of a string is salted per process (PYTHONHASHSEED), so a ring built on
    it would send a session to a different worker after every restart, and two router replicas
    would disagree. BLAKE2b of the UTF-8 bytes is fixed by its specification.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=1024)
def ring_points(worker: str, virtual_nodes: int) -> tuple[int, ...]:
    """A worker's points on the ring (the same for every ring it joins, so computed once)."""
    return tuple(stable_hash(f"{worker}#{i}") for i in range(virtual_nodes))


class ConsistentHashRouter(_WorkerPool):
    """RIGHT: a session always goes to the same worker, chosen on a hash ring.

    Each worker owns ``virtual_nodes`` points on a ring of 2**64 positions; a session goes to
    the first point clockwise from ``stable_hash(session_id)``. One point per worker gives
    wildly unequal arcs (with 2 workers, one often owns 80% of the ring). More points average
    the arcs out, but only as 1/sqrt(points): over 60 random sets of 4 worker URLs, 100 points
    each left the worker furthest from its fair share a median 11% (worst 22%) off it, 1,000
    points 3.5% (worst 8%). Hence the default of 1,000: the ring is still only a few thousand ints.
    Even arcs do not make few sessions land evenly, though: 6 sessions on 2 workers split 4 and
    2 as often as not (``BoundedLoadHashRouter`` caps that).

    Why a ring and not ``hash(session_id) % N``: when N changes, modulo reshuffles almost every
    session (and every worker's cache goes cold at once), while on the ring a leaving worker's
    points simply vanish, so only *its* sessions move, each to the next point clockwise; a
    joining worker takes over only the arcs just before its new points, about 1/N of sessions.
    """

    name = "session"

    def __init__(self, workers: Iterable[str], virtual_nodes: int = 1000) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be at least 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        # Sorted (point, worker) pairs; the worker breaks the (astronomically rare) tie of two
        # workers' points colliding, so the ring never depends on insertion order.
        self._ring: list[tuple[int, str]] = []
        self._building = True  # the constructor's workers: one sort for all of them
        super().__init__(workers)
        self._building = False
        self._ring.sort()

    def add_worker(self, worker: str) -> None:
        super().add_worker(worker)
        self._ring.extend((point, worker) for point in ring_points(worker, self.virtual_nodes))
        if not self._building:
            self._ring.sort()

    def remove_worker(self, worker: str) -> None:
        super().remove_worker(worker)
        self._ring = [entry for entry in self._ring if entry[1] != worker]

    def route(
        self, session_id: str, request_index: int = 0, prompt: Sequence[int] = (), salt: str = ""
    ) -> str:
        self._require_workers()
        return self._ring[self._first_point(session_id)][1]

    def preference_list(self, session_id: str) -> list[str]:
        """The live workers in the order the ring offers them to ``session_id``.

        The first is its worker; the second is where the session goes if the first is removed,
        which is where a request in flight on a failed worker should be retried.
        """
        self._require_workers()
        start = self._first_point(session_id)
        seen: list[str] = []
        for offset in range(len(self._ring)):
            worker = self._ring[(start + offset) % len(self._ring)][1]
            if worker not in seen:
                seen.append(worker)
                if len(seen) == len(self._workers):
                    break
        return seen

    def _first_point(self, session_id: str) -> int:
        """Index of the first ring point at or clockwise after the session's hash."""
        index = bisect.bisect_left(self._ring, (stable_hash(session_id), ""))
        return index % len(self._ring)  # past the last point the ring wraps to the first


def load_cap(balance_factor: float, items: int, bins: int) -> int:
    """The most items one bin may hold: ``ceil(balance_factor * items / bins)``, computed exactly
    (in floating point 1.1 * 10 / 11 is a hair above 1, and its ceiling 2)."""
    factor = Fraction(balance_factor).limit_denominator(10_000)
    return math.ceil(factor * items / bins)


class _Balanced(_WorkerPool):
    """The load bound the two load-aware routers share.

    A worker's load is the number of sessions whose latest request it was sent. Each session
    has at most one request in flight (the user reads a reply before answering), so with every
    session busy this is the worker's share of the requests in flight, without needing a clock:
    a simulation replays the same decisions. A worker may take a request only while its load,
    with this session counted, stays within ``load_cap`` of all the sessions seen.
    """

    def __init__(self, workers: Iterable[str], balance_factor: float) -> None:
        if balance_factor < 1:
            raise ValueError(
                f"balance_factor must be at least 1 (1: exactly the fair share), got {balance_factor}"
            )
        self.balance_factor = balance_factor
        self._latest: dict[str, str] = {}  # session -> the worker its latest request went to
        super().__init__(workers)

    def remove_worker(self, worker: str) -> None:
        super().remove_worker(worker)
        # Its sessions are placed afresh (their cache there is gone): they no longer load it.
        self._latest = {s: w for s, w in self._latest.items() if w != worker}

    def _loads_without(self, session_id: str) -> Counter[str]:
        return Counter(w for s, w in self._latest.items() if s != session_id)

    def _under_cap(self, session_id: str) -> list[str]:
        """The live workers that may take a request of ``session_id`` (never none: the loads of
        the other sessions sum to less than N caps)."""
        workers = self._require_workers()
        loads = self._loads_without(session_id)
        sessions = len(self._latest) + (session_id not in self._latest)
        cap = load_cap(self.balance_factor, sessions, len(workers))
        return [w for w in workers if loads[w] < cap]


class BoundedLoadHashRouter(_Balanced):
    """Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, SODA 2018).

    A new session walks its ring preference list and takes the first worker holding fewer than
    ``ceil(balance_factor * sessions / N)`` sessions; once placed it stays there (moving it
    would throw its cached prefix away), until its worker leaves. With many sessions the ring
    alone is already near fair and this changes almost nothing; with few, it stops one worker
    collecting twice the share of another.
    """

    name = "session_bounded"

    def __init__(
        self,
        workers: Iterable[str],
        balance_factor: float = DEFAULT_BALANCE_FACTOR,
        virtual_nodes: int = 1000,
    ) -> None:
        self._ring = ConsistentHashRouter(workers, virtual_nodes)
        super().__init__(self._ring.workers, balance_factor)

    def add_worker(self, worker: str) -> None:
        super().add_worker(worker)
        if worker not in self._ring.workers:  # the constructor's workers are on the ring already
            self._ring.add_worker(worker)

    def remove_worker(self, worker: str) -> None:
        super().remove_worker(worker)
        self._ring.remove_worker(worker)

    def route(
        self, session_id: str, request_index: int = 0, prompt: Sequence[int] = (), salt: str = ""
    ) -> str:
        self._require_workers()
        home = self._latest.get(session_id)
        if home is None:
            allowed = set(self._under_cap(session_id))
            home = next(w for w in self._ring.preference_list(session_id) if w in allowed)
            self._latest[session_id] = home
        return home


class PrefixAwareRouter(_Balanced):
    """Send a request where the longest prefix of its tokens is cached, within the load bound.

    What SGLang's cache-aware router and llm-d's prefix-cache scorer do, reduced to its rule:
    among the workers under the load cap, the one whose cache serves the most of the prompt
    wins; a tie (nothing cached anywhere, or only the prefix every worker has) goes to the
    least-loaded, then to the earliest-added worker. It never reads the session id to choose:
    a session stays put only because its own history is cached where it last went.

    Like SGLang's router it keeps its own index of the prompts it sent to each worker (a block
    chain per worker and cache namespace, as vLLM hashes them) instead of asking the workers; so
    it does not see evictions, and believes a worker still holds what it has since dropped.
    """

    name = "prefix_aware"

    def __init__(
        self, workers: Iterable[str], block_size: int = 16, balance_factor: float = DEFAULT_BALANCE_FACTOR
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._index: dict[tuple[str, str], PrefixCacheModel] = {}  # (worker, salt) -> what it was sent
        super().__init__(workers, balance_factor)

    def remove_worker(self, worker: str) -> None:
        super().remove_worker(worker)
        self._index = {key: model for key, model in self._index.items() if key[0] != worker}

    def cached_tokens(self, worker: str, prompt: Sequence[int], salt: str = "") -> int:
        """What the router believes ``worker`` would serve of ``prompt`` from its cache."""
        model = self._index.get((worker, salt))
        return model.predict(prompt).cached_tokens if model is not None and prompt else 0

    def route(
        self, session_id: str, request_index: int = 0, prompt: Sequence[int] = (), salt: str = ""
    ) -> str:
        allowed = self._under_cap(session_id)
        loads = self._loads_without(session_id)
        order = {w: i for i, w in enumerate(self._workers)}
        chosen = min(allowed, key=lambda w: (-self.cached_tokens(w, prompt, salt), loads[w], order[w]))
        self._latest[session_id] = chosen
        if prompt:
            self._index.setdefault((chosen, salt), PrefixCacheModel(self.block_size)).record(prompt)
        return chosen


def make_router(
    name: str,
    workers: Sequence[str],
    seed: int = 0,
    block_size: int = 16,
    balance_factor: float = DEFAULT_BALANCE_FACTOR,
) -> Router:
    """Build a router by its command-line name (``ROUTER_NAMES``).

    ``seed`` only matters for "random"; the hash-based ones are deterministic by design.
    ``block_size`` is the prefix-aware router's (it matches whole blocks, as the engine does);
    ``balance_factor`` the load bound of the two load-aware ones.
    """
    if name == "round_robin":
        return RoundRobinRouter(workers)
    if name == "random":
        return RandomRouter(workers, seed)
    if name == "session":
        return ConsistentHashRouter(workers)
    if name == "session_bounded":
        return BoundedLoadHashRouter(workers, balance_factor)
    if name == "prefix_aware":
        return PrefixAwareRouter(workers, block_size, balance_factor)
    raise ValueError(f"unknown router {name!r}; valid names: {', '.join(ROUTER_NAMES)}")


# --- what a routing decision predicts for the cache -------------------------------------------


def sticky_fraction(assignments: Sequence[tuple[str, str]]) -> float:
    """Of all turns after a session's first, the fraction sent where the previous turn went.

    ``assignments`` is ``(session_id, worker)`` in the order the requests were sent. Such a
    turn finds its whole history (previous prompt and reply) cached, so this is the share of
    turns that can reuse the full conversation. 0.0 when no session has a second turn.
    """
    last_worker: dict[str, str] = {}
    followups = same = 0
    for session_id, worker in assignments:
        if session_id in last_worker:
            followups += 1
            same += worker == last_worker[session_id]
        last_worker[session_id] = worker
    return same / followups if followups else 0.0


def any_seen_fraction(assignments: Sequence[tuple[str, str]]) -> float:
    """Of all turns after a session's first, the fraction sent to a worker that served *some*
    earlier turn of that session.

    Those turns reuse at least the older part of the conversation; the gap between this and
    ``sticky_fraction`` is the turns that find only a stale piece of their history.
    """
    served: dict[str, set[str]] = {}
    followups = seen = 0
    for session_id, worker in assignments:
        workers = served.setdefault(session_id, set())
        if workers:
            followups += 1
            seen += worker in workers
        workers.add(worker)
    return seen / followups if followups else 0.0


def busiest_share(workers: Sequence[str]) -> float:
    """The share of the requests the busiest worker served (``workers``: one per request).

    1/N is a perfectly even spread over N workers; session affinity cannot beat the share of
    the busiest session, however many workers there are.
    """
    return max(Counter(workers).values()) / len(workers) if workers else 0.0


# --- when the turns of the sessions arrive -----------------------------------------------------

Arrival = tuple[float, str, int]  # (seconds since start, session_id, turn number from 0)


def session_id(index: int) -> str:
    """The id of session number ``index``, as every schedule here names it."""
    return f"session-{index}"


def session_number(session: str) -> int:
    """The inverse of ``session_id``."""
    return int(session.rsplit("-", 1)[1])


def arrival_schedule(sessions: int, turns: int, seed: int, mean_think_s: float) -> list[Arrival]:
    """Concurrent sessions whose users think for a random time between turns, time-ordered.

    Each session starts at a random moment within the first think time, and every later turn
    follows its previous one after an exponentially distributed pause (mean ``mean_think_s``),
    the textbook model of independent users. Merged, the sessions interleave irregularly, as
    they do in front of a real router. Same ``seed``, same schedule.

    Why not simply let the sessions take turns in a fixed cycle (turn 0 of every session, then
    turn 1 of every session, ...)? Because that flatters round robin: with S sessions cycling
    over N workers, request number ``t * S + s`` is session ``s``'s turn ``t`` and round robin
    sends it to worker ``(t * S + s) mod N``. When N divides S that is ``s mod N`` for every
    turn: each session sticks to one worker by accident and round robin looks exactly as good
    as session routing (4 sessions on 2 workers do it). Irregular arrivals break the accident.

    The times are when the user sends; a reply taking longer than the pause only delays the
    turn, it does not reorder the session's own turns.
    """
    if sessions < 1 or turns < 1:
        raise ValueError(f"need at least one session and one turn, got {sessions} x {turns}")
    if mean_think_s <= 0:
        raise ValueError(f"mean_think_s must be positive, got {mean_think_s}")
    rng = random.Random(seed)
    timed: list[tuple[float, int, int]] = []
    for s in range(sessions):
        t = rng.uniform(0.0, mean_think_s)
        for turn in range(turns):
            if turn:
                t += rng.expovariate(1.0 / mean_think_s)
            timed.append((t, s, turn))
    timed.sort()  # by time; a tie (practically never) by session number, then turn
    return [(t, session_id(s), turn) for t, s, turn in timed]
