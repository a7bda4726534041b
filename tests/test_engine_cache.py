"""The harness's prediction against the real engine, request by request.

Prompts are built as token IDs so each divergence sits exactly where the test says: before,
at and after block boundaries, identical prompts, after a reset, and with generated tokens.
"""

from __future__ import annotations

import pytest

from harness.backend import OfflineBackend
from harness.errors import UserError
from harness.prefix import PrefixCacheModel

pytestmark = pytest.mark.engine

BASE = [(1000 + 7 * i) % 40000 + 100 for i in range(200)]  # 200 ordinary tokens, no specials


def changed_at(index: int, length: int = 200) -> list[int]:
    ids = list(BASE[:length])
    ids[index] = 5 if ids[index] != 5 else 6
    return ids


def run_sequence(
    engine: OfflineBackend, prompts: list[list[int]], max_tokens: int = 1
) -> list[tuple[int, int]]:
    """(engine cached, predicted cached) per prompt, from a cold cache."""
    engine.start_variant()
    model = PrefixCacheModel(engine.info.block_size)
    pairs = []
    for ids in prompts:
        predicted = model.predict(ids).cached_tokens
        reply = engine.generate_tokens(ids, max_tokens=max_tokens)
        model.record(ids, reply.output_token_ids or ())
        pairs.append((reply.cached_tokens, predicted))
    return pairs


def test_block_size_is_what_the_harness_asked_for(engine: OfflineBackend) -> None:
    assert engine.info.block_size == 32


@pytest.mark.parametrize(
    ("divergence", "expected"),
    [(5, 0), (31, 0), (32, 32), (33, 32), (64, 64), (150, 128)],
)
def test_divergence_around_block_boundaries(engine: OfflineBackend, divergence: int, expected: int) -> None:
    pairs = run_sequence(engine, [list(BASE), changed_at(divergence)])
    assert pairs[0] == (0, 0)
    assert pairs[1] == (expected, expected)


def test_identical_prompt_recomputes_its_last_block(engine: OfflineBackend) -> None:
    # 200 tokens: L - 1 = 199 -> 6 full blocks = 192. A block-aligned 192-token prompt gets 160.
    assert run_sequence(engine, [list(BASE), list(BASE)])[1] == (192, 192)
    assert run_sequence(engine, [BASE[:192], BASE[:192]])[1] == (160, 160)


def test_prefix_of_earlier_prompt_and_extension(engine: OfflineBackend) -> None:
    pairs = run_sequence(engine, [BASE[:100], list(BASE), BASE[:70]])
    assert pairs == [(0, 0), (96, 96), (64, 64)]


def test_reset_empties_the_cache(engine: OfflineBackend) -> None:
    run_sequence(engine, [list(BASE)])
    assert run_sequence(engine, [list(BASE)]) == [(0, 0)]


def test_generated_tokens_are_cached_too(engine: OfflineBackend) -> None:
    # With 40 generated tokens, blocks filled during decoding are cached as well: a follow-up
    # prompt that continues with exactly those tokens reuses them (all but the last sampled one).
    engine.start_variant()
    model = PrefixCacheModel(engine.info.block_size)
    first = BASE[:50]
    reply = engine.generate_tokens(first, max_tokens=40)
    model.record(first, reply.output_token_ids or ())
    assert reply.output_token_ids is not None
    follow_up = first + list(reply.output_token_ids) + BASE[100:130]
    predicted = model.predict(follow_up)
    second = engine.generate_tokens(follow_up)
    assert second.cached_tokens == predicted.cached_tokens
    if len(reply.output_token_ids) == 40:  # no early EOS: 50 + 39 computed tokens = 2 full blocks
        assert predicted.cached_tokens == 64


def test_cache_salt_isolates(engine: OfflineBackend) -> None:
    engine.start_variant()
    engine.generate_tokens(list(BASE), cache_salt="a")
    assert engine.generate_tokens(list(BASE), cache_salt="a").cached_tokens == 192
    assert engine.generate_tokens(list(BASE), cache_salt="b").cached_tokens == 0


def test_engine_counters_move_with_requests(engine: OfflineBackend) -> None:
    engine.start_variant()
    before = engine.counters()
    engine.generate_tokens(list(BASE))
    engine.generate_tokens(list(BASE))
    after = engine.counters()
    assert before is not None and after is not None
    assert (after - before).queries == 400
    assert (after - before).hits == 192


def test_prompt_longer_than_context_is_a_clear_error(engine: OfflineBackend) -> None:
    too_long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(UserError, match="longer than the model's context of 8192 tokens"):
        engine.generate(too_long)
