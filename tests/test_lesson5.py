"""Lesson 5: the AUC on known inputs, the guessing logic, the salt plumbing, and the attack on the
real engine in quick mode (exact cached tokens, never timing)."""

from __future__ import annotations

import argparse

import pytest
from conftest import run_script

import prefix_cache_isolation as lesson
from harness.backend import OfflineBackend
from harness.measure import RequestRecord, roc_auc


def test_roc_auc_on_known_inputs() -> None:
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5  # ties count half
    # 2 positives (0.9, 0.4) x 3 negatives (0.8, 0.3, 0.1): wins 3 + 2 = 5 of 6
    assert roc_auc([0.9, 0.8, 0.4, 0.3, 0.1], [True, False, True, False, False]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc([1.0, 2.0], [True, True])


def probe(trial: int, true: bool, ttft: float, cached: int = 0) -> RequestRecord:
    return RequestRecord(
        0, 100, cached, cached, ttft, 0, extra={"trial": trial, "true": true, "candidate": "x"}
    )


def test_the_attacker_picks_the_fastest_candidate() -> None:
    records = [
        probe(0, True, 100.0), probe(0, False, 300.0), probe(0, False, 310.0),  # right
        probe(1, False, 90.0), probe(1, True, 200.0), probe(1, False, 300.0),   # wrong: a decoy was fastest
    ]  # fmt: skip
    attack = lesson.Attack("wrong", "x", records, [])
    assert attack.trials == 2
    assert attack.accuracy() == 0.5
    # positives' -TTFT (-100, -200) each beat three of the negatives' (-300, -310, -90, -300)
    assert attack.auc() == pytest.approx(6 / 8)
    assert attack.hit_ttft_ms() == (150.0, 300.0)


def test_salts() -> None:
    assert lesson.salts_wrong() == lesson.Salts(None, None)
    a, b = lesson.salts_right(), lesson.salts_right()
    assert a.victim and a.attacker and a.victim != a.attacker
    assert a != b  # new per run: a server's cache outlives one lesson


def test_probe_is_the_victims_template_with_another_account() -> None:
    victim = lesson.victim_request("123456", "Any fee?")
    probe_ = lesson.probe_request("123456")
    assert victim[0] == probe_[0]
    assert lesson.probe_request("654321")[0]["content"] == victim[0]["content"].replace("123456", "654321")


def test_trials_below_two_is_a_one_line_error() -> None:
    proc = run_script("prefix_cache_isolation.py", "--trials", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --trials must be at least 2")
    assert "Traceback" not in proc.stderr


@pytest.mark.engine
def test_quick_attack_on_the_engine(engine: OfflineBackend) -> None:
    result = lesson.run(engine, argparse.Namespace(quick=True, trials=None, seed=0, max_tokens=1))
    block = engine.info.block_size
    for name in ("wrong", "right"):
        for r in result.variant(name).requests:
            assert r.cached_tokens == r.predicted_cached_tokens, (name, r)
    wrong = result.variant("wrong").requests
    right = result.variant("right").requests
    assert len(wrong) == len(right) == lesson.QUICK_TRIALS * lesson.CANDIDATES
    # WRONG: a true candidate reuses the victim's blocks past the account number; a decoy stops
    # at the block holding its first wrong digit. RIGHT: every probe meets only its own tenant's
    # cache: the public template the attacker sent itself, the same for true and decoy.
    data = result.to_json()  # the lesson's findings as its JSON gives them
    leak = data["leak"][0]
    upto_number = block * (leak["first_secret_token"] // block)
    assert {r.cached_tokens for r in wrong if not r.extra["true"]} == {upto_number}
    assert all(r.cached_tokens > upto_number for r in wrong if r.extra["true"])
    assert {r.cached_tokens for r in right} == {upto_number}
    assert data["attack"]["wrong"]["accuracy"] >= 0.0  # timing is reported, not asserted
    shared, domain, tenant = (p["cached_tokens"] for p in data["price_of_isolation"])
    assert shared > domain > tenant > 0
    assert all(p["prediction_matches"] for p in data["price_of_isolation"])
    split = data["leak"][1]["cached_by_right_digits"]
    assert split["3"] == split["2"] + block  # three right digits fill the block before the boundary
