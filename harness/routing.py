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

This module holds the policies lesson 4 compares, behind one small interface (``Router``):

* ``RoundRobinRouter`` and ``RandomRouter`` ignore the session (WRONG);
* ``ConsistentHashRouter`` hashes the session id on a ring with virtual nodes (RIGHT);
* ``LeastLoadedAffinityRouter`` keeps the session's worker unless it is clearly overloaded.

plus the arithmetic the lesson prints as "expected" next to what the engines measured
(``sticky_fraction``, ``any_seen_fraction``) and a seeded arrival process for the sessions
(``arrival_schedule``). Nothing here talks to an engine.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

ROUTER_NAMES: tuple[str, ...] = ("round_robin", "random", "session", "least_loaded")


class NoWorkersError(RuntimeError):
    """Every worker has been removed: there is nowhere left to send a request."""


@runtime_checkable
class Router(Protocol):
    """Picks the worker (an id such as a base URL) that serves one request of one session."""

    name: str

    @property
    def workers(self) -> list[str]:
        """The live workers, in the order they were added."""
        ...

    def route(self, session_id: str, request_index: int) -> str:
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

    def route(self, session_id: str, request_index: int) -> str:
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

    def route(self, session_id: str, request_index: int) -> str:
        return self._rng.choice(self._require_workers())


def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process, on every machine.

    Python's ``hash()`` of a string is salted per process (PYTHONHASHSEED), so a ring built on
    it would send a session to a different worker after every restart, and two router replicas
    would disagree. BLAKE2b of the UTF-8 bytes is fixed by its specification.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ConsistentHashRouter(_WorkerPool):
    """RIGHT: a session always goes to the same worker, chosen on a hash ring.

    Each worker owns ``virtual_nodes`` points on a ring of 2**64 positions; a session goes to
    the first point clockwise from ``stable_hash(session_id)``. One point per worker gives
    wildly unequal arcs (with 2 workers, one often owns 80% of the ring). More points average
    the arcs out, but only as 1/sqrt(points): over 60 random sets of 4 worker URLs, 100 points
    each left the worker furthest from its fair share a median 11% (worst 22%) off it, 1,000
    points 3.5% (worst 8%). Hence the default of 1,000: the ring is still only a few thousand ints.

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
        super().__init__(workers)

    def add_worker(self, worker: str) -> None:
        super().add_worker(worker)
        self._ring.extend((point, worker) for point in self._points_of(worker))
        self._ring.sort()

    def remove_worker(self, worker: str) -> None:
        super().remove_worker(worker)
        self._ring = [entry for entry in self._ring if entry[1] != worker]

    def route(self, session_id: str, request_index: int = 0) -> str:
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

    def _points_of(self, worker: str) -> list[int]:
        return [stable_hash(f"{worker}#{i}") for i in range(self.virtual_nodes)]


class LeastLoadedAffinityRouter(_WorkerPool):
    """Session affinity that gives way under load: stay unless your worker is swamped.

    A session's *home* is its consistent-hash worker until it has been moved. A request goes
    home unless home has more than ``max_imbalance`` requests outstanding beyond the
    least-loaded worker; then it goes to the least-loaded worker, and that becomes the new
    home (the session's freshest prefix is cached there now, so coming back would miss).
    Every routed request counts as outstanding until the caller reports it with
    ``finished(worker)``; a caller that forgets makes its workers look ever busier.
    With ``max_imbalance`` at or above the concurrency nothing ever moves: plain consistent
    hashing.
    """

    name = "least_loaded"

    def __init__(
        self, workers: Iterable[str], virtual_nodes: int = 1000, max_imbalance: int = 2
    ) -> None:
        if max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance}")
        self.max_imbalance = max_imbalance
        self._ring = ConsistentHashRouter(workers, virtual_nodes)
        self._outstanding: dict[str, int] = {}
        self._home: dict[str, str] = {}
        super().__init__(self._ring.workers)

    def add_worker(self, worker: str) -> None:
        super().add_worker(worker)
        if worker not in self._ring.workers:  # the constructor's workers are on the ring already
            self._ring.add_worker(worker)
        self._outstanding[worker] = 0

    def remove_worker(self, worker: str) -> None:
        super().remove_worker(worker)
        self._ring.remove_worker(worker)
        del self._outstanding[worker]
        # Forget homes on the dead worker: those sessions fall back to the ring's next worker.
        self._home = {s: w for s, w in self._home.items() if w != worker}

    @property
    def outstanding(self) -> dict[str, int]:
        return dict(self._outstanding)

    def route(self, session_id: str, request_index: int) -> str:
        self._require_workers()
        home = self._home.get(session_id) or self._ring.route(session_id)
        # Ties go to the earliest-added worker, so the choice is deterministic.
        least = min(self._workers, key=lambda w: self._outstanding[w])
        chosen = home
        if self._outstanding[home] - self._outstanding[least] > self.max_imbalance:
            chosen = least
        self._home[session_id] = chosen
        self._outstanding[chosen] += 1
        return chosen

    def finished(self, worker: str) -> None:
        """A request sent to ``worker`` has completed (or failed): it no longer loads it."""
        if self._outstanding.get(worker, 0) <= 0:
            raise ValueError(f"worker {worker!r} has no outstanding request to finish")
        self._outstanding[worker] -= 1


def make_router(name: str, workers: Sequence[str], seed: int = 0) -> Router:
    """Build a router by its command-line name (``ROUTER_NAMES``).

    ``seed`` only matters for "random"; the hash-based ones are deterministic by design.
    """
    if name == "round_robin":
        return RoundRobinRouter(workers)
    if name == "random":
        return RandomRouter(workers, seed)
    if name == "session":
        return ConsistentHashRouter(workers)
    if name == "least_loaded":
        return LeastLoadedAffinityRouter(workers)
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


# --- when the turns of the sessions arrive -----------------------------------------------------

Arrival = tuple[float, str, int]  # (seconds since start, session_id, turn number from 0)


def session_id(index: int) -> str:
    """The id of session number ``index``, as every schedule here names it."""
    return f"session-{index}"


def arrival_schedule(sessions: int, turns: int, seed: int, mean_think_s: float) -> list[Arrival]:
    """Concurrent sessions whose users think for a random time between turns, time-ordered.

    Each session starts at a random moment within the first think time, and every later turn
    follows its previous one after an exponentially distributed pause (mean ``mean_think_s``),
    the textbook model of independent users. Merged, the sessions interleave irregularly, as
    they do in front of a real router. Same ``seed``, same schedule.

    Why not simply let the sessions take turns in a fixed cycle (``fixed_cycle_schedule``)?
    Because that flatters round robin: with S sessions cycling over N workers, request number
    ``t * S + s`` is session ``s``'s turn ``t`` and round robin sends it to worker
    ``(t * S + s) mod N``. When N divides S that is ``s mod N`` for every turn: each session
    sticks to one worker by accident and round robin looks exactly as good as session
    routing (4 sessions on 2 workers do it). Irregular arrivals break the accident.

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


def fixed_cycle_schedule(sessions: int, turns: int) -> list[Arrival]:
    """The dishonest order: turn 0 of every session, then turn 1 of every session, and so on."""
    if sessions < 1 or turns < 1:
        raise ValueError(f"need at least one session and one turn, got {sessions} x {turns}")
    return [
        (float(t * sessions + s), session_id(s), t) for t in range(turns) for s in range(sessions)
    ]


def route_schedule(router: Router, schedule: Iterable[Arrival]) -> list[tuple[str, str]]:
    """``(session_id, worker)`` for each arrival, in order, as ``router`` decides them.

    Each request counts as finished before the next arrives (a load-aware router is told so),
    which is what the schedule's think times mean when replies are quick; under real overlap
    a load-aware router may move sessions this prediction keeps in place. It consumes the
    router's state (round robin's counter, the random stream), so give it a fresh router when
    the numbers must match a later run's.
    """
    finished = getattr(router, "finished", None)
    routed: list[tuple[str, str]] = []
    for index, (_, sid, _) in enumerate(schedule):
        worker = router.route(sid, index)
        if finished is not None:
            finished(worker)
        routed.append((sid, worker))
    return routed


def worker_loads(assignments: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Requests per worker, busiest first (ties by name)."""
    counts: dict[str, int] = {}
    for _, worker in assignments:
        counts[worker] = counts.get(worker, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
