"""The cache rule on hand-computed cases: cached = B * floor(min(P, L - 1) / B)."""

from __future__ import annotations

import pytest

from harness.prefix import PrefixCacheModel, cached_tokens_for, common_prefix_len, explain_divergence


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([5], [6]) == 0


@pytest.mark.parametrize(
    ("prompt_len", "prefix", "block", "expected"),
    [
        (100, 0, 32, 0),  # nothing shared
        (100, 31, 32, 0),  # divergence inside the first block: nothing reusable
        (100, 32, 32, 32),  # divergence exactly at a block boundary
        (100, 33, 32, 32),  # one token into the second block
        (100, 63, 32, 32),
        (100, 64, 32, 64),
        (100, 100, 32, 96),  # identical prompt: the partial last block is not cached
        (96, 96, 32, 64),  # identical, block-aligned: the last token is recomputed, so its block is too
        (97, 96, 32, 96),  # L - 1 == 96 is block-aligned: all 3 blocks reused
        (33, 33, 32, 32),
        (32, 32, 32, 0),  # a one-block identical prompt reuses nothing
        (1, 1, 32, 0),
        (0, 0, 32, 0),
        (300, 250, 128, 128),
        (300, 299, 16, 288),
    ],
)
def test_cached_tokens_for(prompt_len: int, prefix: int, block: int, expected: int) -> None:
    assert cached_tokens_for(prompt_len, prefix, block) == expected


def test_cached_tokens_for_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        cached_tokens_for(10, 5, 0)


def test_model_predicts_against_best_earlier_sequence() -> None:
    m = PrefixCacheModel(block_size=4)
    a = list(range(20))
    b = list(range(10)) + [99] * 10
    assert m.predict(a).cached_tokens == 0
    m.record(a)
    m.record(b)
    p = m.predict(list(range(18)) + [7, 7])
    assert (p.common_prefix, p.cached_tokens, p.source) == (18, 16, 0)
    p = m.predict(list(range(10)) + [99, 99, 99, 1])
    assert (p.common_prefix, p.cached_tokens, p.source) == (13, 12, 1)
    m.reset()
    assert m.predict(a).cached_tokens == 0


def test_generated_tokens_count_except_the_last() -> None:
    # The last sampled token's KV is never computed, so it can never be served from cache.
    m = PrefixCacheModel(block_size=4)
    m.record([1, 2, 3, 4, 5, 6], output=[7, 8, 9])
    p = m.predict([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    assert p.common_prefix == 8
    assert p.cached_tokens == 8


def test_explain_divergence_reports_both_sides() -> None:
    def decode(ids: object) -> str:
        return "".join(chr(ord("a") + i) for i in ids)  # type: ignore[attr-defined]

    d = explain_divergence([0, 1, 2, 3, 4], [0, 1, 9, 3], decode, context_tokens=2)
    assert (d.index, d.before, d.token, d.after, d.previous_token) == (2, "ab", "c", "de", "j")
    same = explain_divergence([0, 1], [0, 1, 2], decode)
    assert (same.index, same.token, same.previous_token) == (2, "", "c")


def test_index_equals_brute_force_on_random_sequences() -> None:
    """The block-hash index against the definition: the longest common prefix with any
    recorded sequence, the most recent one on a tie, and the block rule on top."""
    import random

    rng = random.Random(7)
    for block in (1, 3, 4, 8):
        m = PrefixCacheModel(block_size=block)
        seen: list[list[int]] = []
        for _ in range(300):
            if seen and rng.random() < 0.7:  # edit or extend an earlier one: shared prefixes
                base = rng.choice(seen)
                cut = rng.randint(0, len(base))
                prompt = base[:cut] + [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
            else:
                prompt = [rng.randint(0, 3) for _ in range(rng.randint(0, 20))]
            best, source = 0, None
            for i, s in enumerate(seen):
                n = common_prefix_len(prompt, s)
                if n > best or (n == best and n > 0):
                    best, source = n, i
            p = m.predict(prompt)
            assert p.common_prefix == best
            assert p.cached_tokens == cached_tokens_for(len(prompt), best, block)
            if best > 0:
                assert p.source == source
            output = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
            m.record(prompt, output)
            seen.append(prompt + output[:-1])
            assert list(m.sequence(-1)) == seen[-1]


def _resync_by_definition(new: list[int], old: list[int], start: int, window: int) -> tuple[int, int]:
    """resync as first written: every window of ``old`` in a dict, every run compared token by token."""
    grams: dict[tuple[int, ...], list[int]] = {}
    for j in range(start, len(old) - window + 1):
        grams.setdefault(tuple(old[j : j + window]), []).append(j)
    best, best_run = (len(new), len(old)), 0
    for i in range(start, len(new) - window + 1):
        for j in grams.get(tuple(new[i : i + window]), ()):
            run = common_prefix_len(new[i:], old[j:])
            if j + run == len(old):
                return i, j
            if run > best_run:
                best, best_run = (i, j), run
    return best


def test_resync_equals_its_definition_on_random_edits() -> None:
    """The byte-search resync against the n-gram definition: a value replaced, a block moved
    (a reordered list: runs that stop agreeing), two changes (no agreement to the end), none."""
    import random

    from harness.prefix import RESYNC, resync

    rng = random.Random(11)
    for _ in range(400):
        old = [rng.randint(0, 5) for _ in range(rng.randint(0, 80))]
        new = list(old)
        start = rng.randint(0, len(old))
        kind = rng.randrange(4)
        if kind == 0:  # a value replaced at start
            new[start : start + rng.randint(0, 4)] = [rng.randint(0, 5) for _ in range(rng.randint(1, 4))]
        elif kind == 1 and len(old) > start + 10:  # a piece moved (reordered)
            cut = rng.randint(start + 1, len(old) - 1)
            new = old[:start] + old[cut:] + old[start:cut]
        elif kind == 2:  # two changes
            new[start : start + 1] = [9]
            if len(new) > start + 20:
                new[start + 15] = 8
        new += [rng.randint(0, 5) for _ in range(rng.randint(0, 10))]  # the next turn appended
        start = min(start, common_prefix_len(new, old))
        assert resync(new, old, start) == _resync_by_definition(new, old, start, RESYNC), (new, old, start)


def test_a_bounded_cache_evicts_least_recently_used_tail_first() -> None:
    m = PrefixCacheModel(block_size=2, capacity_blocks=2)
    a = [1, 2, 3, 4, 5, 6, 7]  # three full blocks and a last token
    m.record(a)
    assert m.blocks == 2 and m.evicted_blocks == 1
    assert m.predict(a).cached_tokens == 4  # the tail block went first: the first two remain
    m.record([9, 9, 8, 8, 7])  # another prompt's two blocks push both of a's out
    assert m.predict(a).cached_tokens == 0 and m.evicted_blocks == 3
    assert m.predict([9, 9, 8, 8, 1]).cached_tokens == 4
    m.record([9, 9, 1, 1, 0])  # reuses one block, adds one: the least recently used (8, 8) goes
    assert m.predict([9, 9, 8, 8, 1]).cached_tokens == 2
    assert m.peak_blocks == 2


def test_sequences_are_kept_as_what_they_add() -> None:
    m = PrefixCacheModel(block_size=4)
    session = [list(range(10))]
    for n in range(20):  # an agent session: each request extends the one before
        session.append(session[-1] + [100 + n] * 7)
        m.record(session[-1])
    assert [list(m.sequence(i)) for i in range(len(m))] == session[1:]
    assert sum(len(tail) for _, _, tail in m._parts) < 2 * len(session[-1])
    assert m.sequence_length(5) == len(session[6])
