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
    Arrival,
    BoundedLoadHashRouter,
    ConsistentHashRouter,
    NoWorkersError,
    PrefixAwareRouter,
    RandomRouter,
    RoundRobinRouter,
    Router,
    any_seen_fraction,
    arrival_schedule,
    busiest_share,
    load_cap,
    make_router,
    session_id,
    session_number,
    stable_hash,
    sticky_fraction,
)

REPO = Path(__file__).resolve().parents[1]
WORKERS = [f"http://127.0.0.1:{8001 + i}" for i in range(6)]
MANY_SESSIONS = [session_id(i) for i in range(10_000)]


def assignment(router: ConsistentHashRouter, sessions: list[str]) -> dict[str, str]:
    return {s: router.route(s, 0) for s in sessions}


def fixed_cycle_schedule(sessions: int, turns: int) -> list[Arrival]:
    """The dishonest order: turn 0 of every session, then turn 1 of every session, and so on."""
    return [(float(t * sessions + s), session_id(s), t) for t in range(turns) for s in range(sessions)]


def route_schedule(router: Router, schedule: list[Arrival]) -> list[tuple[str, str]]:
    """``(session_id, worker)`` for each arrival, in order, as ``router`` decides them."""
    return [(sid, router.route(sid, index)) for index, (_, sid, _) in enumerate(schedule)]


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


def test_busiest_share_is_the_busiest_workers_share_of_the_requests() -> None:
    assert busiest_share(["w2", "w1", "w2", "w3", "w1"]) == pytest.approx(2 / 5)
    assert busiest_share(["w1"] * 12 + ["w2"] * 6) == pytest.approx(2 / 3)  # 4 sessions vs 2, 3 turns each
    assert busiest_share([]) == 0.0


def test_session_number_inverts_session_id() -> None:
    assert [session_number(session_id(i)) for i in (0, 7, 123)] == [0, 7, 123]


# --- the load-aware policies ----------------------------------------------------------------


def sessions_homed_on(worker: str, workers: list[str], count: int) -> list[str]:
    ring = ConsistentHashRouter(workers)
    found = [s for s in MANY_SESSIONS if ring.route(s, 0) == worker][:count]
    assert len(found) == count
    return found


def test_load_cap_is_the_fair_share_times_the_factor_rounded_up_exactly() -> None:
    assert load_cap(1.25, 6, 2) == 4  # 6 sessions on 2 workers: 3.75 -> 4
    assert load_cap(1.25, 6, 4) == 2
    assert load_cap(1.1, 10, 11) == 1  # 1.1 * 10 / 11 is 1 exactly, not a hair above
    assert load_cap(1.25, 1, 32) == 1


def test_bounded_load_hashing_is_consistent_hashing_when_the_ring_is_fair() -> None:
    router = BoundedLoadHashRouter(WORKERS[:3])
    ring = ConsistentHashRouter(WORKERS[:3])
    sessions = MANY_SESSIONS[:600]
    first = {s: router.route(s, i) for i, s in enumerate(sessions)}
    assert all(router.route(s, 600 + i) == first[s] for i, s in enumerate(sessions))  # sticky
    moved = [s for s in sessions if first[s] != ring.route(s, 0)]
    # Only while the first few sessions are placed is the cap tight enough to overrule the ring.
    assert len(moved) == 7
    assert max(Counter(first.values()).values()) <= load_cap(1.25, 600, 3)


def test_bounded_load_hashing_caps_a_crowded_worker_and_keeps_its_sessions_sticky() -> None:
    home, other = WORKERS[0], WORKERS[1]
    crowd = sessions_homed_on(home, WORKERS[:2], 6)  # the plain ring puts all six on one worker
    router = BoundedLoadHashRouter(WORKERS[:2], balance_factor=1.25)
    placed = [router.route(s, i) for i, s in enumerate(crowd)]
    # caps as sessions arrive: ceil(1.25 k / 2) = 1, 2, 2, 3, 4, 4
    assert placed == [home, home, other, home, home, other]
    assert [router.route(s, 10 + i) for i, s in enumerate(crowd)] == placed  # and they stay


def test_bounded_load_hashing_moves_only_the_sessions_of_a_leaving_worker() -> None:
    router = BoundedLoadHashRouter(WORKERS[:3])
    before = {s: router.route(s, 0) for s in MANY_SESSIONS[:300]}
    gone = WORKERS[2]
    router.remove_worker(gone)
    after = {s: router.route(s, 1) for s in MANY_SESSIONS[:300]}
    assert {s for s in before if before[s] != after[s]} == {s for s in before if before[s] == gone}


def test_prefix_aware_sends_a_turn_where_its_history_is_cached() -> None:
    router = PrefixAwareRouter(WORKERS[:3], block_size=4)
    system = list(range(100, 108))  # two blocks every session shares
    a0, b0 = system + [1] * 8, system + [2] * 8
    assert router.route("a", 0, a0) == WORKERS[0]  # nothing cached anywhere: the first worker
    # Worker 0 holds b's system prompt, but 2 sessions on 3 workers cap each at ceil(1.25 * 2 / 3) = 1.
    assert router.route("b", 1, b0) == WORKERS[1]
    assert router.route("a", 2, a0 + [9] * 4) == WORKERS[0]  # its whole history is there
    assert router.route("b", 3, b0 + [9] * 4) == WORKERS[1]
    assert router.cached_tokens(WORKERS[0], a0 + [9] * 4) == 16
    assert router.cached_tokens(WORKERS[1], a0 + [9] * 4) == 8  # b's system prompt, nothing of a
    assert router.cached_tokens(WORKERS[2], a0 + [9] * 4) == 0


def test_prefix_aware_respects_the_load_bound_and_the_spilled_session_then_stays() -> None:
    router = PrefixAwareRouter(WORKERS[:2], block_size=4, balance_factor=1.25)
    system = list(range(100, 108))
    prompts = {s: system + [s] * 8 for s in range(5)}
    placed = [router.route(session_id(s), s, prompts[s]) for s in range(5)]
    # The shared system prompt pulls new sessions to worker 0 until the cap (ceil(1.25 k / 2): 1, 2,
    # 2, 3, 4) stops the third; once worker 1 holds the system prompt too, a tie goes to the less loaded.
    assert placed == [WORKERS[0], WORKERS[0], WORKERS[1], WORKERS[1], WORKERS[0]]
    # Session 2 spilled to worker 1; its history is there now, so its next turn follows it.
    assert router.route(session_id(2), 5, prompts[2] + [7] * 4) == WORKERS[1]


def test_prefix_aware_keeps_cache_namespaces_apart_and_survives_a_worker_leaving() -> None:
    router = PrefixAwareRouter(WORKERS[:2], block_size=4)
    prompt = list(range(16))
    router.route("a", 0, prompt, salt="tenant-1")
    assert router.cached_tokens(WORKERS[0], prompt, salt="tenant-1") == 12
    assert router.cached_tokens(WORKERS[0], prompt, salt="tenant-2") == 0  # salted: shares nothing
    router.remove_worker(WORKERS[0])
    assert router.route("a", 1, prompt, salt="tenant-1") == WORKERS[1]
    with pytest.raises(ValueError, match="balance_factor"):
        PrefixAwareRouter(WORKERS[:2], balance_factor=0.9)


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
