"""Router unit tests: affinity, balance, minimal movement, and the round-robin trap.

Pure Python, no engine. Worker ids look like the lesson's loopback servers, because balance
depends on the exact strings hashed onto the ring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from harness.routing import (
    ROUTER_NAMES,
    ConsistentHashRouter,
    LeastLoadedAffinityRouter,
    NoWorkersError,
    RandomRouter,
    RoundRobinRouter,
    Router,
    any_seen_fraction,
    arrival_schedule,
    fixed_cycle_schedule,
    make_router,
    route_schedule,
    session_id,
    stable_hash,
    sticky_fraction,
    worker_loads,
)

REPO = Path(__file__).resolve().parents[1]
WORKERS = [f"http://127.0.0.1:{8001 + i}" for i in range(6)]
MANY_SESSIONS = [session_id(i) for i in range(10_000)]


def assignment(router: ConsistentHashRouter, sessions: list[str]) -> dict[str, str]:
    return {s: router.route(s, 0) for s in sessions}


# --- consistent hashing: the RIGHT router ----------------------------------------------------


def test_consistent_hash_sends_a_session_to_the_same_worker_every_time() -> None:
    router = ConsistentHashRouter(WORKERS[:3])
    first = assignment(router, MANY_SESSIONS[:300])
    for request_index in range(1, 20):  # interleaved, as concurrent sessions arrive
        for s in MANY_SESSIONS[:300]:
            assert router.route(s, request_index) == first[s]
    assert set(first.values()) == set(WORKERS[:3])  # sticky, but not all on one worker


@pytest.mark.parametrize("n_workers", [2, 3, 4])
def test_consistent_hash_balances_many_sessions(n_workers: int) -> None:
    router = ConsistentHashRouter(WORKERS[:n_workers])
    counts = Counter(assignment(router, MANY_SESSIONS).values())
    fair = len(MANY_SESSIONS) / n_workers
    worst = max(abs(counts[w] - fair) / fair for w in WORKERS[:n_workers])
    # Measured: 4.3%, 6.0%, 4.2% off the fair share for 2, 3, 4 workers (1,000 vnodes).
    assert worst <= 0.10, (n_workers, dict(counts))


def test_virtual_nodes_are_what_makes_the_ring_fair() -> None:
    def worst_share(virtual_nodes: int) -> float:
        router = ConsistentHashRouter(WORKERS[:4], virtual_nodes=virtual_nodes)
        counts = Counter(assignment(router, MANY_SESSIONS[:4000]).values())
        return max(abs(counts[w] - 1000) / 1000 for w in WORKERS[:4])

    # Measured: one point per worker leaves a worker 84% off its share; 1,000 points, ~4%.
    assert worst_share(1) > 0.4
    assert worst_share(1000) < 0.1


def test_a_leaving_worker_moves_only_its_own_sessions_to_their_next_worker() -> None:
    router = ConsistentHashRouter(WORKERS[:4])
    before = assignment(router, MANY_SESSIONS)
    next_on_ring = {s: router.preference_list(s)[1] for s in MANY_SESSIONS}
    gone = WORKERS[1]
    router.remove_worker(gone)
    after = assignment(router, MANY_SESSIONS)

    moved = {s for s in MANY_SESSIONS if before[s] != after[s]}
    assert moved == {s for s in MANY_SESSIONS if before[s] == gone}
    assert 0.15 < len(moved) / len(MANY_SESSIONS) < 0.35  # measured 0.250 (its share of 4)
    assert all(after[s] in router.workers and after[s] != gone for s in moved)
    assert all(after[s] == next_on_ring[s] for s in moved)


def test_a_joining_worker_takes_about_one_nth_and_only_for_itself() -> None:
    router = ConsistentHashRouter(WORKERS[:4])
    before = assignment(router, MANY_SESSIONS)
    router.add_worker(WORKERS[4])
    after = assignment(router, MANY_SESSIONS)

    moved = [s for s in MANY_SESSIONS if before[s] != after[s]]
    fraction = len(moved) / len(MANY_SESSIONS)
    assert 0.5 / 5 <= fraction <= 1.5 / 5, fraction  # measured 0.197 (fair: 1/5)
    assert all(after[s] == WORKERS[4] for s in moved)


def test_a_worker_that_comes_back_gets_exactly_its_sessions_back() -> None:
    router = ConsistentHashRouter(WORKERS[:3])
    before = assignment(router, MANY_SESSIONS[:2000])
    router.remove_worker(WORKERS[0])
    router.add_worker(WORKERS[0])
    assert assignment(router, MANY_SESSIONS[:2000]) == before
    # ...and the ring does not depend on the order the workers were added in.
    reordered = ConsistentHashRouter([WORKERS[2], WORKERS[0], WORKERS[1]])
    assert assignment(reordered, MANY_SESSIONS[:2000]) == before


def test_preference_list_starts_with_the_worker_and_names_every_live_one() -> None:
    router = ConsistentHashRouter(WORKERS[:4])
    for s in MANY_SESSIONS[:200]:
        order = router.preference_list(s)
        assert order[0] == router.route(s, 0)
        assert sorted(order) == sorted(WORKERS[:4])


def test_the_ring_is_the_same_in_another_process_with_another_hash_seed() -> None:
    sessions = [session_id(i) for i in range(40)] + ["user-42/chat-7", "ü-session"]
    here = {s: ConsistentHashRouter(WORKERS[:3]).route(s, 0) for s in sessions}
    code = (
        "import json, sys\n"
        "from harness.routing import ConsistentHashRouter\n"
        "workers, sessions = json.loads(sys.argv[1])\n"
        "router = ConsistentHashRouter(workers)\n"
        "print(json.dumps({s: router.route(s, 0) for s in sessions}))\n"
    )
    for hash_seed in ("0", "12345"):  # str hash() differs under these; the ring must not
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps([WORKERS[:3], sessions])],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            check=True,
        )
        assert json.loads(out.stdout) == here
    assert len(set(here.values())) == 3


def test_stable_hash_is_blake2b_and_pinned() -> None:
    # Pinned so a change of hash function (which would re-home every session) cannot go unseen.
    assert stable_hash("session-0") == 13141386955394713551
    assert stable_hash("session-0") != stable_hash("session-1")
    assert 0 <= stable_hash("") < 2**64


# --- the WRONG routers -------------------------------------------------------------------------


def test_round_robin_rotates_per_request_whatever_the_session() -> None:
    router = RoundRobinRouter(WORKERS[:3])
    got = [router.route("one-session", i) for i in range(7)]
    assert got == [WORKERS[0], WORKERS[1], WORKERS[2]] * 2 + [WORKERS[0]]
    router.remove_worker(WORKERS[1])
    # The counter carries on (8th request: 7 mod 2 -> the second live worker).
    after = [router.route("one-session", i) for i in range(7, 11)]
    assert after == [WORKERS[2], WORKERS[0]] * 2


def test_random_router_repeats_with_its_seed_and_changes_with_another() -> None:
    def picks(seed: int) -> list[str]:
        router = RandomRouter(WORKERS[:3], seed=seed)
        return [router.route("s", i) for i in range(50)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    assert set(picks(7)) == set(WORKERS[:3])


def test_round_robin_looks_perfect_on_a_fixed_cycle_when_n_divides_s() -> None:
    # The trap: S sessions in a fixed cycle, round robin sends turn t of session s to
    # worker (t*S + s) mod N, which is s mod N for every t when N divides S.
    for sessions, workers in ((4, 2), (6, 2), (6, 3)):
        cycle = fixed_cycle_schedule(sessions, turns=5)
        routed = route_schedule(RoundRobinRouter(WORKERS[:workers]), cycle)
        assert sticky_fraction(routed) == 1.0, (sessions, workers)
    # When N does not divide S the same cycle scatters every session.
    routed = route_schedule(RoundRobinRouter(WORKERS[:2]), fixed_cycle_schedule(5, 5))
    assert sticky_fraction(routed) == 0.0


def test_realistic_arrivals_expose_round_robin_and_not_session_routing() -> None:
    rr_sticky = []
    for seed in range(10):
        schedule = arrival_schedule(sessions=6, turns=5, seed=seed, mean_think_s=20.0)
        rr = route_schedule(RoundRobinRouter(WORKERS[:2]), schedule)
        ring = route_schedule(ConsistentHashRouter(WORKERS[:2]), schedule)
        rr_sticky.append(sticky_fraction(rr))
        assert sticky_fraction(rr) < 0.7, seed  # measured 0.25 .. 0.58
        assert sticky_fraction(ring) == 1.0
        assert any_seen_fraction(ring) == 1.0
    assert sum(rr_sticky) / len(rr_sticky) < 0.5  # measured 0.40 (a coin flip would be 0.5)


# --- the arrival process ----------------------------------------------------------------------


def test_arrival_schedule_is_seeded_ordered_and_complete() -> None:
    schedule = arrival_schedule(sessions=6, turns=5, seed=3, mean_think_s=20.0)
    assert schedule == arrival_schedule(sessions=6, turns=5, seed=3, mean_think_s=20.0)
    assert schedule != arrival_schedule(sessions=6, turns=5, seed=4, mean_think_s=20.0)
    times = [t for t, _, _ in schedule]
    assert times == sorted(times) and times[0] >= 0.0
    assert len(schedule) == 30
    for s in range(6):
        turns = [turn for _, sid, turn in schedule if sid == session_id(s)]
        assert turns == list(range(5))  # a session's own turns never overtake each other
    order = [(sid, turn) for _, sid, turn in schedule]
    assert order != [(sid, turn) for _, sid, turn in fixed_cycle_schedule(6, 5)]


def test_arrival_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one session"):
        arrival_schedule(sessions=0, turns=3, seed=0, mean_think_s=1.0)
    with pytest.raises(ValueError, match="mean_think_s"):
        arrival_schedule(sessions=2, turns=3, seed=0, mean_think_s=0.0)


# --- what a routing decision predicts ----------------------------------------------------------


def test_sticky_and_any_seen_fractions_count_follow_up_turns_only() -> None:
    routed = [("a", "w1"), ("b", "w2"), ("a", "w2"), ("a", "w1"), ("b", "w2"), ("c", "w1")]
    # Follow-ups: a#2 (w2 after w1), a#3 (w1 after w2, but a was on w1 before), b#2 (w2 again).
    assert sticky_fraction(routed) == pytest.approx(1 / 3)
    assert any_seen_fraction(routed) == pytest.approx(2 / 3)
    assert sticky_fraction([("a", "w1")]) == 0.0
    assert any_seen_fraction([]) == 0.0


def test_worker_loads_counts_requests_busiest_first() -> None:
    loads = worker_loads([("a", "w2"), ("b", "w1"), ("c", "w2"), ("d", "w3"), ("e", "w1")])
    assert list(loads.items()) == [("w1", 2), ("w2", 2), ("w3", 1)]


# --- the optional third policy -----------------------------------------------------------------


def sessions_homed_on(worker: str, workers: list[str], count: int) -> list[str]:
    ring = ConsistentHashRouter(workers)
    found = [s for s in MANY_SESSIONS if ring.route(s, 0) == worker][:count]
    assert len(found) == count
    return found


def test_least_loaded_affinity_is_consistent_hashing_when_load_is_even() -> None:
    router = LeastLoadedAffinityRouter(WORKERS[:3])
    ring = ConsistentHashRouter(WORKERS[:3])
    for index, s in enumerate(MANY_SESSIONS[:500] * 3):
        worker = router.route(s, index)
        assert worker == ring.route(s, 0)
        router.finished(worker)  # one request at a time: nothing ever piles up
    assert router.outstanding == {w: 0 for w in WORKERS[:3]}


def test_route_schedule_reports_each_request_finished_to_a_load_aware_router() -> None:
    schedule = arrival_schedule(sessions=6, turns=5, seed=0, mean_think_s=20.0)
    router = LeastLoadedAffinityRouter(WORKERS[:2], max_imbalance=0)
    routed = route_schedule(router, schedule)
    assert sticky_fraction(routed) == 1.0  # nothing piles up, so nothing is moved
    assert router.outstanding == {w: 0 for w in WORKERS[:2]}


def test_least_loaded_affinity_spills_an_overloaded_worker_and_then_stays() -> None:
    home, other = WORKERS[0], WORKERS[1]
    crowd = sessions_homed_on(home, WORKERS[:2], 4)
    router = LeastLoadedAffinityRouter(WORKERS[:2], max_imbalance=2)
    # Three in flight on home is 3 more than the idle worker: the fourth session spills.
    assert [router.route(s, i) for i, s in enumerate(crowd)] == [home, home, home, other]
    assert router.outstanding == {home: 3, other: 1}
    # The spilled session's freshest prefix is now on `other`: it stays there when load evens out.
    for _ in range(3):
        router.finished(home)
    router.finished(other)
    assert router.route(crowd[3], 4) == other
    assert router.route(crowd[0], 5) == home


def test_least_loaded_affinity_survives_a_worker_leaving() -> None:
    router = LeastLoadedAffinityRouter(WORKERS[:3])
    gone = WORKERS[2]
    mine = sessions_homed_on(gone, WORKERS[:3], 5)
    for i, s in enumerate(mine):
        router.finished(router.route(s, i))
    router.remove_worker(gone)
    ring = ConsistentHashRouter(WORKERS[:2])
    assert [router.route(s, 10 + i) for i, s in enumerate(mine)] == [ring.route(s) for s in mine]
    with pytest.raises(ValueError, match="no outstanding request"):
        router.finished(gone)


# --- construction and errors -------------------------------------------------------------------


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_make_router_builds_every_named_policy(name: str) -> None:
    router = make_router(name, WORKERS[:2], seed=1)
    assert isinstance(router, Router)
    assert router.name == name
    assert router.workers == WORKERS[:2]
    assert router.route("s", 0) in WORKERS[:2]


def test_make_router_names_the_valid_choices_when_given_a_wrong_one() -> None:
    with pytest.raises(ValueError) as excinfo:
        make_router("sticky", WORKERS[:2], seed=0)
    message = str(excinfo.value)
    assert "'sticky'" in message
    for name in ("round_robin", "random", "session"):
        assert name in message


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_routers_refuse_bad_worker_sets_and_say_when_none_are_left(name: str) -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        make_router(name, [], seed=0)
    with pytest.raises(ValueError, match="already"):
        make_router(name, [WORKERS[0], WORKERS[0]], seed=0)
    router = make_router(name, WORKERS[:1], seed=0)
    with pytest.raises(ValueError, match="not routed to"):
        router.remove_worker(WORKERS[5])
    router.remove_worker(WORKERS[0])
    assert router.workers == []
    with pytest.raises(NoWorkersError):
        router.route("s", 0)
    router.add_worker(WORKERS[1])
    assert router.route("s", 1) == WORKERS[1]
