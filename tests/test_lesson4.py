"""Lesson 4: the session builders, the simulation (its block pool, its expectations, its
scaling study), then the lesson itself on two real local vLLM workers in quick mode (started once
for the module), then its one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_api_key, key_env, run_script, validate

import session_consistency as lesson
from harness.block_pool import BlockPool, CacheTooSmall
from harness.engine import EngineOptions
from harness.errors import UserError
from harness.fleet import fleet_from_servers
from harness.prefix import PrefixCacheModel
from harness.routing import arrival_schedule, session_number
from harness.routing_sim import (
    SCALING_ROUTERS,
    Workload,
    run_salts,
    scaling_study,
    shared_prefix_len,
    simulate,
)
from harness.servers import LocalServers
from harness.workers import VllmRouter

# --- builders and the simulation (no engine) ---------------------------------------------------


def test_each_session_is_append_only_and_shares_only_the_system_prompt() -> None:
    sessions = [lesson.session_requests(i, 4, quick=True) for i in range(3)]
    for turns in sessions:
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later[: len(earlier)] == earlier
    firsts = [turns[0] for turns in sessions]
    assert len({t[0]["content"] for t in firsts}) == 1  # one system prompt for everyone
    assert len({t[1]["content"] for t in firsts}) == 3  # ...and different from the first user message on
    assert "services/search" in sessions[1][3][2]["content"]  # the trace is the session's own


def test_session_content_is_the_same_in_every_run() -> None:
    assert lesson.first_message(5, quick=False) == lesson.first_message(5, quick=False)
    assert lesson.ci_log(2, 6) != lesson.ci_log(3, 6)
    assert len(lesson.ci_log(0, 36).splitlines()) == 37


def test_simulation_sticky_router_reuses_whole_history() -> None:
    # Two sessions of three turns; each turn's prompt extends the previous one by 40 tokens.
    arrivals = arrival_schedule(sessions=2, turns=3, seed=1, mean_think_s=1.0)
    prompts = [
        [1000 * (session_number(sid) + 1) + k for k in range(100 + 40 * turn)] for _, sid, turn in arrivals
    ]
    salts = ["run"] * len(arrivals)
    workers = ["worker-0", "worker-1"]
    ring = simulate("session", arrivals, prompts, workers, 32, 0, salts)
    for (_, _, turn), prompt, cached in zip(arrivals, prompts, ring.cached, strict=True):
        previous = len(prompt) - 40
        assert cached == (0 if turn == 0 else 32 * (previous // 32))
    rr = simulate("round_robin", arrivals, prompts, workers, 32, 0, salts)
    assert rr.workers == [workers[i % 2] for i in range(len(arrivals))]
    assert rr.hit_rate <= ring.hit_rate


def test_simulated_failover_moves_only_the_dead_workers_sessions() -> None:
    arrivals = arrival_schedule(sessions=6, turns=3, seed=0, mean_think_s=1.0)
    prompts = [[session_number(sid)] * (64 + turn) for _, sid, turn in arrivals]
    workers = ["worker-0", "worker-1"]
    salts = ["run"] * len(arrivals)
    plain = simulate("session", arrivals, prompts, workers, 32, 0, salts)
    killed = simulate("session", arrivals, prompts, workers, 32, 0, salts, kill_at=6)
    victim = plain.workers[6]
    for index, (before, after) in enumerate(zip(plain.workers, killed.workers, strict=True)):
        if index < 6 or before != victim:
            assert before == after
        else:
            assert after != victim


def test_per_session_salt_shares_nothing_across_sessions() -> None:
    arrivals = arrival_schedule(sessions=4, turns=2, seed=0, mean_think_s=1.0)
    prompts = [list(range(64)) + [session_number(sid)] * (10 + turn) for _, sid, turn in arrivals]
    workers = ["worker-0", "worker-1"]
    shared = simulate("session", arrivals, prompts, workers, 32, 0, ["run"] * len(arrivals))
    isolated = simulate("session", arrivals, prompts, workers, 32, 0, [sid for _, sid, _ in arrivals])
    first_turns = [i for i, (_, _, turn) in enumerate(arrivals) if turn == 0]
    assert all(isolated.cached[i] == 0 for i in first_turns)
    assert sum(shared.cached[i] for i in first_turns) > 0  # the system prompt, on a warm worker


# --- the bounded cache: vLLM's block pool, LRU --------------------------------------------------


def test_a_pool_large_enough_predicts_what_the_unbounded_model_predicts() -> None:
    rng = random.Random(0)
    for _ in range(20):
        pool, unbounded = BlockPool(4, 10_000).namespace("run"), PrefixCacheModel(4)
        seen: list[list[int]] = []
        for _ in range(30):  # extensions and branches of earlier prompts, and fresh ones
            base = rng.choice(seen)[: rng.randrange(0, 40)] if seen and rng.random() < 0.7 else []
            prompt = base + [rng.randrange(5) for _ in range(rng.randrange(1, 14))]
            output = [rng.randrange(5) for _ in range(rng.randrange(0, 3))]
            assert pool.predict(prompt).cached_tokens == unbounded.predict(prompt).cached_tokens
            pool.record(prompt, output)
            unbounded.record(prompt, output)
            seen.append(prompt)


def blocks(*firsts: int) -> list[int]:
    """Whole blocks of 4 tokens, each filled with its first token (distinct blocks, distinct tokens)."""
    return [t for first in firsts for t in range(first, first + 4)]


def test_the_least_recently_used_prompt_is_evicted_first() -> None:
    pool = BlockPool(4, 6)
    cache = pool.namespace("run")
    a, b, c = blocks(100, 110) + [1], blocks(200, 210) + [2], blocks(300, 310) + [3]
    cache.record(a)  # 3 blocks: 2 full, cached; 1 partial, back with the unused ones
    cache.record(b)
    cache.record(a)  # hits its 2 blocks: a is now more recently used than b
    assert pool.evicted_blocks == 0
    cache.record(c)  # 3 blocks: the 2 without content, then the least recently used cached one
    assert pool.evicted_blocks == 1
    assert cache.predict(a).cached_tokens == 8
    assert cache.predict(b).cached_tokens == 4  # the tail of b's chain went first; its head stayed


def test_blocks_without_content_are_reused_before_any_cached_block() -> None:
    pool = BlockPool(4, 4)
    cache = pool.namespace("run")
    cache.record(blocks(100, 110) + [1])  # 2 cached blocks and a partial one, back in the pool
    cache.record([7, 7])  # one block: the partial one or the never-used one, not a cached block
    cache.record([8, 8])
    assert pool.evicted_blocks == 0
    assert cache.predict(blocks(100, 110) + [1]).cached_tokens == 8


def test_a_chain_broken_in_the_middle_is_found_only_up_to_the_break() -> None:
    pool = BlockPool(4, 5)
    cache = pool.namespace("run")
    cache.record(blocks(100, 110, 120, 130) + [1])  # 5 blocks: 4 cached, freed tail first
    cache.record(blocks(200) + [2])  # 2 blocks: the one without content, then 130 (the deepest)
    cache.record(blocks(300) + [3])  # the same: then 120
    assert pool.evicted_blocks == 2
    assert cache.predict(blocks(100, 110, 120, 130) + [1]).cached_tokens == 8


def test_salts_share_the_blocks_of_a_worker_but_never_a_hit() -> None:
    pool = BlockPool(4, 6)
    prompt = blocks(100, 110) + [1]
    pool.namespace("tenant-1").record(prompt)
    assert pool.namespace("tenant-2").predict(prompt).cached_tokens == 0
    pool.namespace("tenant-2").record(prompt)
    pool.namespace("tenant-3").record(prompt)  # 3 more blocks in a pool of 6: one of tenant-1's goes
    assert pool.evicted_blocks == 1
    assert pool.namespace("tenant-1").predict(prompt).cached_tokens == 4  # the tail of its chain
    assert pool.namespace("tenant-3").predict(prompt).cached_tokens == 8


def test_a_prompt_larger_than_the_worker_cannot_run() -> None:
    with pytest.raises(CacheTooSmall, match="needs 3 blocks of 4; the worker has 2"):
        BlockPool(4, 2).namespace("run").record(blocks(100, 110) + [1])


# --- the same sessions on more workers ---------------------------------------------------------


def synthetic_workload(sessions: int = 6, turns: int = 3, seed: int = 0) -> Workload:
    """A 64-token system prompt every session shares, then 48 tokens of its own per turn."""
    arrivals = arrival_schedule(sessions, turns, seed, mean_think_s=1.0)
    system = list(range(64))
    prompts = [
        system + [1000 * (session_number(sid) + 1) + k for k in range(48 * (turn + 1))]
        for _, sid, turn in arrivals
    ]
    return Workload(arrivals, [[] for _ in arrivals], prompts, 64, shared_prefix_len(prompts))


def study(
    workload: Workload, cache_blocks: int | None, counts: tuple[int, ...]
) -> dict[tuple[int, str], Any]:
    salts = run_salts(workload.arrivals, "run", per_session=False)
    rows = scaling_study(workload, salts, 32, 0, cache_blocks, counts)
    assert [(r.workers, r.router) for r in rows] == [
        (n, router) for n in counts for router in SCALING_ROUTERS
    ]
    assert all(r.simulated for r in rows)
    return {(r.workers, r.router): r for r in rows}


def test_more_workers_than_requests_leave_round_robin_nothing_and_session_routing_everything() -> None:
    workload = synthetic_workload()
    rows = study(workload, None, (2, 32))
    total = sum(len(p) for p in workload.prompts)
    assert rows[(32, "round_robin")].cached_tokens == 0  # 18 requests, each on a fresh worker
    assert rows[(32, "round_robin")].prefill_tokens == total
    assert rows[(32, "round_robin")].max_worker_share == pytest.approx(1 / 18)
    # A sticky session finds its previous turn on its worker however many workers there are.
    assert rows[(2, "session")].own_tokens_hit_rate == rows[(32, "session")].own_tokens_hit_rate
    assert rows[(32, "session")].own_tokens_hit_rate > 0.4
    assert rows[(32, "round_robin")].own_tokens_hit_rate == 0.0
    assert all(r.evicted_blocks == 0 for r in rows.values())  # unbounded caches


def test_bounded_caches_evict_and_a_balanced_router_evicts_less() -> None:
    workload = synthetic_workload()
    unbounded, bounded = study(workload, None, (2,)), study(workload, 12, (2,))
    for router in SCALING_ROUTERS:
        assert bounded[(2, router)].cached_tokens <= unbounded[(2, router)].cached_tokens
    # 12 blocks hold the shared prompt and about two sessions: round robin asks each worker for all
    # six, the ring gives one worker four, the prefix-aware router three each.
    evicted = {
        router: bounded[(2, router)].evicted_blocks for router in ("round_robin", "session", "prefix_aware")
    }
    assert evicted == {"round_robin": 21, "session": 10, "prefix_aware": 6}
    assert bounded[(2, "session")].own_tokens_hit_rate > bounded[(2, "round_robin")].own_tokens_hit_rate
    assert bounded[(2, "prefix_aware")].cached_tokens == unbounded[(2, "prefix_aware")].cached_tokens


def test_bounded_load_hashing_spreads_sessions_the_plain_ring_piles_up() -> None:
    rows = study(synthetic_workload(), None, (4,))
    # The run's 6 session ids put 4 on one of 4 workers (12 of 18 requests); the bound allows 2.
    assert rows[(4, "session")].max_worker_share == pytest.approx(12 / 18)
    assert rows[(4, "session_bounded")].max_worker_share == pytest.approx(6 / 18)
    assert rows[(4, "session_bounded")].own_tokens_hit_rate == rows[(4, "session")].own_tokens_hit_rate


def test_scaling_cache_smaller_than_a_prompt_is_refused_before_any_request() -> None:
    settings = lesson.settings_from(quick_args(scale_cache_tokens=64))
    with pytest.raises(
        UserError, match="--scale-cache-tokens 64 is 2 blocks of 32; the longest prompt needs"
    ):
        lesson.simulated_cache_blocks(settings, 32, synthetic_workload())


def test_random_router_runs_only_when_asked() -> None:
    def names(**overrides: object) -> list[str]:
        return [plan.name for plan in lesson.plans(lesson.settings_from(quick_args(**overrides)))]

    assert names() == ["wrong", "right", "failover"]
    assert names(with_random=True, kill_worker_at=0) == ["wrong", "right", "random"]
    assert names(with_random=True, router="vllm-router") == ["wrong", "right", "random", "failover"]


# --- the lesson on two real workers ------------------------------------------------------------


@dataclass
class LessonRun:
    result: lesson.RoutingResult
    cli: subprocess.CompletedProcess[str]  # the script itself, pointed at the same workers
    cli_json: dict[str, Any]
    ports: list[int]
    leftovers: list[str]  # command lines still mentioning a worker's port after the run
    refused: subprocess.CompletedProcess[str]  # the script on the same workers without their key
    api_key: str


def quick_args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "quick": True,
        "sessions": None,
        "turns": None,
        "workers": 2,
        "endpoints": None,
        "endpoint": None,
        "api_key": None,
        "router": "script",
        "kill_worker_at": None,  # the default: a third of the way in
        "cache_salt": "run",
        "with_random": False,
        "seed": 0,
        "think_ms": 200.0,
        "max_tokens": 1,
        "scale_workers": "2,4,8,16,32",
        "scale_cache_tokens": lesson.DEFAULT_SCALE_CACHE_TOKENS,
        "scale_plot": None,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def processes_mentioning(ports: list[int]) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in args)
        if any(f"--port {port}" in text for port in ports):
            found.append(text)
    return found


@pytest.fixture(scope="module")
def lesson_run(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> LessonRun:
    """Start two workers that need an API key, as shared deployments do; run the script on them as
    --endpoints (WRONG, RIGHT) with the key in VLLM_API_KEY, then the lesson in-process as their
    owner (WRONG, RIGHT, FAILOVER, which crashes one); stop them."""
    settings = lesson.settings_from(quick_args())
    logs = tmp_path_factory.mktemp("lesson4-workers")
    out = logs / "lesson4.json"
    opts = EngineOptions(model=model_path, device="cpu")
    with LocalServers(opts, count=2, log_dir=logs, api_key=fresh_api_key()) as servers:
        ports = [s.port for s in servers]
        endpoints = ",".join(s.url for s in servers)
        refused = run_script("session_consistency.py", "--quick", "--endpoints", endpoints)
        cli = run_script(
            "session_consistency.py",
            "--quick",
            "--endpoints",
            endpoints,
            "--think-ms",
            "200",
            "--json",
            str(out),
            env=key_env(servers[0]),
        )
        fleet = fleet_from_servers(servers, "SmolLM2-135M-Instruct", "cpu")
        result = asyncio.run(lesson.run_lesson(fleet, settings))
    cli_json = json.loads(out.read_text()) if out.exists() else {}
    if cli_json:
        validate("lesson", cli_json)
    key = servers[0].api_key
    return LessonRun(result, cli, cli_json, ports, processes_mentioning(ports), refused, key)


@pytest.mark.engine
def test_session_routing_beats_round_robin(lesson_run: LessonRun) -> None:
    wrong_run, right_run = lesson_run.result.run("wrong"), lesson_run.result.run("right")
    wrong = lesson_run.result.variant("wrong").summary()
    right = lesson_run.result.variant("right").summary()
    assert right_run.sticky_fraction == 1.0
    assert wrong_run.sticky_fraction < 0.6
    # Quick mode shares a 546-token system prompt every worker caches anyway (measured 61.7% vs
    # 71.0%); on the tokens that are each session's own, the gap is wide (34.7% vs 56.5%).
    assert right["hit_rate"] > wrong["hit_rate"] + 0.05
    assert right_run.own_tokens_hit_rate > wrong_run.own_tokens_hit_rate + 0.15
    for run in (wrong_run, right_run):  # every session visits both workers under RR, one under RIGHT
        maps = run.session_map()
        assert len(maps) == 4 and all(len(turns) == 3 for turns in maps.values())
    assert all(len(set(t)) == 1 for t in right_run.session_map().values())


@pytest.mark.engine
def test_prediction_and_expectation_are_exact(lesson_run: LessonRun) -> None:
    for variant in lesson_run.result.variants:
        for r in variant.requests:
            assert r.cached_tokens == r.predicted_cached_tokens, (variant.name, r)
            assert r.ttft_ms > 0
        # routed in the same order as simulated before sending: the same numbers, token for token
        assert lesson_run.result.run(variant.name).expected_matches_measured, variant.name


@pytest.mark.engine
def test_worker_counters_equal_the_per_request_sums(lesson_run: LessonRun) -> None:
    for variant in lesson_run.result.variants:
        tallies = lesson_run.result.run(variant.name).sent.tallies
        for tally in tallies:
            assert tally.counters_agree, (variant.name, tally)
            served = [r for r in variant.requests if r.extra["worker"] == tally.name]
            assert tally.counters.hits == sum(r.cached_tokens for r in served)
            assert tally.counters.queries == sum(r.prompt_tokens for r in served)
        assert variant.counters_agree() is True


@pytest.mark.engine
def test_failover_answers_every_request_and_moves_only_the_dead_workers_sessions(
    lesson_run: LessonRun,
) -> None:
    report = lesson_run.result.run("failover").failover
    assert report is not None
    kill_at = lesson_run.result.settings.kill_at
    assert kill_at == 4
    assert report.requests_answered == report.requests == 12
    assert report.failover.after_requests == kill_at
    assert report.failover.retried == [kill_at]  # crashed while that request was in flight
    assert report.moved_sessions
    assert report.moved_to_next_on_ring and report.other_sessions_kept_their_worker
    records = lesson_run.result.variant("failover").requests
    retried = [r for r in records if "retried_from" in r.extra]
    assert {r.index for r in retried} >= {kill_at}
    assert all(r.extra["retried_from"] == report.failover.victim for r in retried)
    assert all(r.extra["worker"] != report.failover.victim for r in records if r.index >= kill_at)
    # the dip (only the system prompt is cached on the new worker) and the recovery after it
    assert report.hit_rate_moved_first_turn is not None and report.hit_rate_moved_later_turns is not None
    assert report.hit_rate_moved_first_turn < report.hit_rate_moved_later_turns


@pytest.mark.engine
def test_the_real_n_row_of_the_scaling_table_equals_the_real_run(lesson_run: LessonRun) -> None:
    data = json.loads(json.dumps(lesson_run.result.to_json()))
    validate("lesson", data)
    rows, settings = data["scaling"], data["scaling_settings"]
    measured = [r for r in rows if not r["simulated"]]
    assert [(r["workers"], r["router"]) for r in measured] == [(2, "round_robin"), (2, "session")]
    for row, variant in zip(measured, ("wrong", "right"), strict=True):
        assert row["equals_simulation"] is True
        assert row["cache_blocks"] == settings["real_workers_num_gpu_blocks"] - 1  # less vLLM's null block
        # the same figures as the run itself...
        assert row["hit_rate"] == data["variants"][["wrong", "right"].index(variant)]["summary"]["hit_rate"]
        assert row["own_tokens_hit_rate"] == data["routing"][variant]["own_tokens_hit_rate"]
        summary = lesson_run.result.variant(variant).summary()
        assert row["prefill_tokens"] == summary["prompt_tokens"] - summary["cached_tokens"]
        # ...and as its replay through the simulation, at the real workers' cache size
        replay = [
            r
            for r in rows
            if r["simulated"]
            and (r["workers"], r["router"], r["cache_blocks"]) == (2, row["router"], row["cache_blocks"])
        ]
        assert len(replay) == 1
        for key in ("own_tokens_hit_rate", "hit_rate", "prefill_tokens", "max_worker_share", "requests"):
            assert replay[0][key] == row[key], key
        assert replay[0]["evicted_blocks"] == 0
    # every simulated row of the study is there, labelled, at the simulated cache size
    grid = [r for r in rows if r["simulated"] and r["cache_blocks"] == settings["cache_blocks_per_worker"]]
    assert {(r["workers"], r["router"]) for r in grid} == {
        (n, router) for n in (2, 4, 8, 16, 32) for router in SCALING_ROUTERS
    }
    assert settings["cache_blocks_per_worker"] == lesson.DEFAULT_SCALE_CACHE_TOKENS // 32


@pytest.mark.engine
def test_json_contract(lesson_run: LessonRun) -> None:
    data = json.loads(json.dumps(lesson_run.result.to_json()))
    validate("lesson", data)
    assert data["example"] == "session_consistency"
    assert data["engine"]["backend"] == "vllm-server" and data["engine"]["block_size"] == 32
    assert [v["name"] for v in data["variants"]] == ["wrong", "right", "failover"]
    for variant in data["variants"]:
        assert set(variant["summary"]) >= {"requests", "prompt_tokens", "cached_tokens", "hit_rate"}
        assert variant["engine_counters"]["agree_with_requests"] is True
        for r in variant["requests"]:
            assert r["worker"] in ("worker-0", "worker-1")
            assert {"index", "prompt_tokens", "cached_tokens", "predicted_cached_tokens", "ttft_ms"} <= set(r)
    assert set(data["comparison"]) >= {"hit_rate_wrong", "hit_rate_right", "ttft_speedup_median"}
    assert set(data["routing"]["right"]["per_worker"]) == {"worker-0", "worker-1"}


@pytest.mark.engine
def test_the_script_on_existing_endpoints_measures_the_same(lesson_run: LessonRun) -> None:
    assert lesson_run.cli.returncode == 0, lesson_run.cli.stderr[-2000:]
    assert lesson_run.api_key not in lesson_run.cli.stdout + lesson_run.cli.stderr
    assert lesson_run.api_key not in json.dumps(lesson_run.cli_json)
    assert "agree with the per-request sums: yes" in lesson_run.cli.stdout
    assert "SIMULATED own-token hit rate" in lesson_run.cli.stdout
    data = lesson_run.cli_json
    assert [r["equals_simulation"] for r in data["scaling"] if not r["simulated"]] == [True, True]
    assert [v["name"] for v in data["variants"]] == ["wrong", "right"]  # not its servers: no crash
    # Same seeded arrivals, same routers, each run cold: the very same cache hits, request by request.
    for variant in data["variants"]:
        again = lesson_run.result.variant(variant["name"]).requests
        assert [(r["worker"], r["cached_tokens"]) for r in variant["requests"]] == [
            (r.extra["worker"], r.cached_tokens) for r in again
        ]


@pytest.mark.engine
def test_endpoints_without_their_key_is_one_line(lesson_run: LessonRun) -> None:
    worker = f"http://127.0.0.1:{lesson_run.ports[0]}"  # the first of --endpoints
    assert_one_line_error(
        lesson_run.refused, f"error: {worker} asks for an API key (401 Unauthorized) and none was given"
    )


@pytest.mark.engine
def test_no_worker_is_left_running(lesson_run: LessonRun) -> None:
    assert lesson_run.leftovers == []
    for port in lesson_run.ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port


# --- one-line errors, before any work ----------------------------------------------------------


def assert_one_line_error(proc: object, starts: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # type: ignore[attr-defined]
    err = proc.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(starts), err


def test_unreachable_endpoint_is_a_one_line_error() -> None:
    proc = run_script(
        "session_consistency.py", "--quick", "--endpoints", "http://127.0.0.1:9,http://127.0.0.1:10"
    )
    assert_one_line_error(proc, "error: cannot reach a vLLM server at http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("flags", "starts"),
    [
        (["--endpoints", "http://127.0.0.1:9"], "error: --endpoints needs at least two"),
        (
            ["--endpoints", "http://a:1,http://b:2", "--kill-worker-at", "3"],
            "error: --kill-worker-at needs workers",
        ),
        (["--kill-worker-at", "12"], "error: --kill-worker-at must be between 1 and 11"),
        (["--workers", "1"], "error: --workers must be at least 2"),
        (["--turns", "1"], "error: --turns must be at least 2"),
        (["--endpoint", "http://127.0.0.1:9"], "error: lesson 4 needs several workers"),
        (["--scale-workers", "2,0"], "error: --scale-workers must be comma-separated worker counts"),
        (["--scale-cache-tokens", "-1"], "error: --scale-cache-tokens must be 0 (unbounded) or more"),
        (["--scale-plot", "scaling.svg"], "error: --scale-plot writes a PNG"),
        (["--scale-plot", "no/such/folder/s.png"], "error: --scale-plot no/such/folder/s.png: folder"),
    ],
)
def test_bad_flags_are_one_line_errors(flags: list[str], starts: str) -> None:
    assert_one_line_error(run_script("session_consistency.py", "--quick", *flags), starts)


def test_vllm_router_is_installed_or_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    beside_python = Path(sys.executable).parent / "vllm-router"
    if not beside_python.exists() and shutil.which("vllm-router") is None:
        with pytest.raises(UserError, match="pip install vllm-router"):
            VllmRouter("round_robin", ["http://127.0.0.1:9"]).command()
    else:
        assert "--policy" in VllmRouter("round_robin", ["http://127.0.0.1:9"]).command()
    if beside_python.exists():  # found beside this Python when .venv/bin is not on PATH
        monkeypatch.setenv("PATH", "/nonexistent")
        assert VllmRouter("round_robin", ["http://127.0.0.1:9"]).command()[0] == str(beside_python)
