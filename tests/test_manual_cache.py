"""The custom engine of lesson 3: marker handling, the prefix KV store, its cache rule beside
APC's, the engine behind the measuring step, and exactness.

The store tests use stand-in KV objects (only their tensors' sizes matter there); everything
about prompts and outputs runs the real default model, loaded once per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from harness.manual_cache import (
    CACHE_MARKER,
    BreakpointBackend,
    BreakpointCacheModel,
    ManualCacheEngine,
    PrefixKVStore,
    kv_bytes_per_token,
    prefix_key,
    split_at_marker,
    strip_marker,
)
from harness.measure import run_variant
from harness.prefix import PrefixCacheModel, common_prefix_len
from harness.scenario import system_prompt

QUESTIONS = [
    "Which tool reads a file?",
    "May you run rm -rf on the repository?",
    "What must you do before editing a file?",
    "How many actions may you output per turn?",
]


def chat(system: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def marked(question: str) -> list[dict[str, str]]:
    """The layout the lesson teaches: stable system prompt, marker, then the question."""
    return chat(system_prompt(quick=True) + CACHE_MARKER, question)


def fake_kv(tokens: int) -> SimpleNamespace:
    """Shaped like a DynamicCache: one layer of K and V, [batch, heads, tokens, dim]."""
    layer = SimpleNamespace(keys=torch.zeros(1, 1, tokens, 2), values=torch.zeros(1, 1, tokens, 2))
    return SimpleNamespace(layers=[layer])


@pytest.fixture(scope="session")
def loaded_manual_engine(model_path: str) -> ManualCacheEngine:
    # model_path (conftest) is resolve_model(None).name_or_path: the prepared default model.
    return ManualCacheEngine(model_path)


@pytest.fixture
def manual(loaded_manual_engine: ManualCacheEngine) -> Iterator[ManualCacheEngine]:
    loaded_manual_engine.reset()  # every test starts cold
    yield loaded_manual_engine
    loaded_manual_engine.reset()


# --------------------------------------------------------------------------- marker


def test_split_at_single_marker() -> None:
    split = split_at_marker(f"stable text{CACHE_MARKER} dynamic", CACHE_MARKER)
    assert split.stable == "stable text"
    assert split.dynamic == " dynamic"
    assert split.warnings == []


def test_split_without_marker_is_all_dynamic_with_warning() -> None:
    split = split_at_marker("no marker here", CACHE_MARKER)
    assert split.stable is None
    assert split.dynamic == "no marker here"
    assert len(split.warnings) == 1
    assert "no cache marker" in split.warnings[0] and "whole prompt is dynamic" in split.warnings[0]


def test_split_with_two_markers_the_last_wins() -> None:
    split = split_at_marker(f"A{CACHE_MARKER}B{CACHE_MARKER}C", CACHE_MARKER)
    assert split.stable == "AB"  # everything before the last marker, earlier marker removed
    assert split.dynamic == "C"
    assert "found 2 times" in split.warnings[0] and "last one" in split.warnings[0]


def test_marker_is_configurable() -> None:
    split = split_at_marker("keep<<CACHE>>ask", "<<CACHE>>")
    assert (split.stable, split.dynamic) == ("keep", "ask")


def test_strip_marker_removes_it_from_every_message() -> None:
    messages = [{"role": "system", "content": f"s{CACHE_MARKER}"}, {"role": "user", "content": "q"}]
    expected = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert strip_marker(messages) == expected


# --------------------------------------------------------------------------- store


def test_store_miss_then_hit() -> None:
    store = PrefixKVStore(max_tokens=100)
    ids = [5, 6, 7]
    assert store.lookup(ids) is None
    assert store.put(ids, fake_kv(3))
    entry = store.lookup(ids)
    assert entry is not None and entry.token_ids == (5, 6, 7)
    assert store.lookup([5, 6, 8]) is None
    assert (store.hits, store.misses) == (1, 2)


def test_store_evicts_least_recently_used_at_the_limit() -> None:
    store = PrefixKVStore(max_tokens=10)
    a, b, c = [1] * 4, [2] * 4, [3] * 4
    store.put(a, fake_kv(4))
    store.put(b, fake_kv(4))
    assert store.lookup(a) is not None  # a is now the most recently used: b is the oldest
    assert store.put(c, fake_kv(4))  # 12 > 10: one entry has to go
    assert store.evicted_keys == [prefix_key(b)]
    assert store.evictions == 1
    assert prefix_key(a) in store and prefix_key(c) in store and prefix_key(b) not in store
    assert store.total_tokens == 8


def test_store_keeps_an_exact_fit_without_evicting() -> None:
    store = PrefixKVStore(max_tokens=8)
    store.put([1] * 4, fake_kv(4))
    store.put([2] * 4, fake_kv(4))
    assert store.total_tokens == 8 and store.evictions == 0


def test_store_refuses_an_entry_larger_than_itself() -> None:
    store = PrefixKVStore(max_tokens=10)
    store.put([1] * 4, fake_kv(4))
    assert not store.put([2] * 11, fake_kv(11))
    assert store.rejected == 1 and store.evictions == 0  # nothing evicted for a lost cause
    assert len(store) == 1 and store.total_tokens == 4


def test_store_bytes_come_from_the_tensors() -> None:
    store = PrefixKVStore(max_tokens=100)
    store.put([1, 2, 3], fake_kv(3))
    assert store.bytes_stored() == 2 * 3 * 2 * 4  # K and V, 3 tokens, dim 2, float32


# --------------------------------------------------------------------------- the cache rule


def test_breakpoint_rule_is_all_or_nothing_at_the_marker_where_apc_keeps_whole_blocks() -> None:
    # Prompts as token IDs, each with where its marker cut (what the backend knows from rendering).
    cut = {(1, 2, 3, 4, 9): 4, (1, 2, 3, 4, 8): 4, (1, 2, 3, 5, 9): 4, (1, 2, 3, 4, 5, 6, 9): 6}
    model = BreakpointCacheModel(lambda ids: cut[tuple(ids)])
    apc = PrefixCacheModel(block_size=2)
    cold = model.predict([1, 2, 3, 4, 9])
    assert (cold.cached_tokens, cold.common_prefix, cold.source) == (0, 0, None)
    for cache in (model, apc):
        cache.record([1, 2, 3, 4, 9], [7, 7])
    assert len(model) == 1 and model.sequence(-1) == (1, 2, 3, 4)  # the stable part only
    hit = model.predict([1, 2, 3, 4, 8])
    assert (hit.cached_tokens, hit.common_prefix, hit.source) == (4, 4, 0)
    changed = [1, 2, 3, 5, 9]  # the stable part differs in its last token
    assert (model.predict(changed).cached_tokens, model.predict(changed).common_prefix) == (0, 3)
    assert apc.predict(changed).cached_tokens == 2  # APC still serves the whole block before it
    # A longer stable part that starts with the stored one is another prefix: a miss.
    assert model.predict([1, 2, 3, 4, 5, 6, 9]).cached_tokens == 0


# --------------------------------------------------------------------------- prompts


def test_marker_is_stripped_from_the_tokens(manual: ManualCacheEngine) -> None:
    prompt = manual.prepare(marked(QUESTIONS[0]))
    marker_ids = manual.tokenizer.encode(CACHE_MARKER, add_special_tokens=False)
    assert CACHE_MARKER not in manual.decode(prompt.token_ids)
    assert "__CACHE_END__" not in manual.decode(prompt.token_ids)
    windows = {
        tuple(prompt.token_ids[i : i + len(marker_ids)])
        for i in range(len(prompt.token_ids) - len(marker_ids) + 1)
    }
    assert tuple(marker_ids) not in windows
    assert prompt.warnings == []


def test_template_owns_bos_and_ids_match_the_chat_path(manual: ManualCacheEngine) -> None:
    messages = marked(QUESTIONS[0])
    prompt = manual.prepare(messages)
    bos = manual.tokenizer.bos_token_id
    assert prompt.token_ids[0] == bos and prompt.token_ids[1] != bos  # no BOS added twice
    # What vLLM's chat path would run for the same messages without the marker:
    reference = manual.tokenizer.apply_chat_template(
        strip_marker(messages), tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert prompt.token_ids == [int(t) for t in reference]


def test_split_is_a_true_token_prefix_even_inside_a_word(manual: ManualCacheEngine) -> None:
    # "wor" + "ld" would merge into " world" if the joined text were tokenized.
    messages = chat(f"Hello wor{CACHE_MARKER}ld", "Hi")
    prompt = manual.prepare(messages)
    text = manual.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    stable_text = text[: text.index(CACHE_MARKER)]
    stable_ids = manual.tokenizer.encode(stable_text, add_special_tokens=False)
    assert prompt.prefix_ids == stable_ids
    assert prompt.token_ids[: prompt.prefix_len] == stable_ids
    joined = manual.tokenizer.encode(text.replace(CACHE_MARKER, ""), add_special_tokens=False)
    assert joined[: len(stable_ids)] != stable_ids  # the naive way would break the prefix


def test_same_stable_part_gives_the_same_prefix_ids(manual: ManualCacheEngine) -> None:
    first, second = (manual.prepare(marked(q)) for q in QUESTIONS[:2])
    assert first.prefix_ids == second.prefix_ids
    assert first.suffix_ids != second.suffix_ids


# --------------------------------------------------------------------------- engine


def test_first_request_misses_then_the_prefix_is_reused(manual: ManualCacheEngine) -> None:
    cold = manual.generate(marked(QUESTIONS[0]), max_new_tokens=2)
    warm = manual.generate(marked(QUESTIONS[1]), max_new_tokens=2)
    assert not cold.prefix_hit and cold.cached_tokens == 0
    assert warm.prefix_hit and warm.cached_tokens == warm.prefix_tokens == cold.prefix_tokens
    assert 0 < warm.prefix_tokens < warm.prompt_tokens
    assert (manual.store.hits, manual.store.misses) == (1, 1)
    assert warm.to_reply().cached_tokens == warm.cached_tokens


def test_backend_prediction_equals_the_engine_through_the_measuring_step(manual: ManualCacheEngine) -> None:
    backend = BreakpointBackend(manual, "SmolLM2-135M-Instruct")
    requests = [marked(q) for q in QUESTIONS[:3]]
    result = run_variant(backend, "right", "breakpoint", requests, max_tokens=1)
    stable = manual.prepare(requests[0]).prefix_len
    assert [r.cached_tokens for r in result.requests] == [0, stable, stable]
    assert [r.predicted_cached_tokens for r in result.requests] == [0, stable, stable]
    assert [r.first_divergence for r in result.requests] == [0, stable, stable]
    assert result.counters is None and [r.prefix_tokens for r in backend.replies] == [stable] * 3
    backend.start_variant()  # a variant starts cold: the store and the replies are empty again
    assert len(manual.store) == 0 and backend.replies == []


def test_engine_without_marker_caches_nothing(manual: ManualCacheEngine) -> None:
    messages = chat(system_prompt(quick=True), QUESTIONS[0])
    for _ in range(2):
        reply = manual.generate(messages, max_new_tokens=1)
        assert not reply.prefix_hit and reply.cached_tokens == 0 and reply.prefix_tokens == 0
        assert any("no cache marker" in w for w in reply.warnings)
    assert len(manual.store) == 0 and manual.store.misses == 0  # never even looked up


def test_engine_with_two_markers_caches_up_to_the_last(manual: ManualCacheEngine) -> None:
    system = f"Rules first.{CACHE_MARKER} Tools second.{CACHE_MARKER}"
    reply = manual.generate(chat(system, "Hi"), max_new_tokens=1)
    expected = manual.tokenizer.encode(
        "<|im_start|>system\nRules first. Tools second.", add_special_tokens=False
    )
    assert reply.prompt_ids[: reply.prefix_tokens] == expected
    assert any("found 2 times" in w for w in reply.warnings)


def test_outputs_with_the_stored_prefix_equal_a_full_recompute(manual: ManualCacheEngine) -> None:
    replies = [manual.generate(marked(q), max_new_tokens=16) for q in QUESTIONS]
    assert [r.prefix_hit for r in replies] == [False, True, True, True]
    for question, reply in zip(QUESTIONS, replies, strict=True):
        baseline = manual.generate_uncached(marked(question), max_new_tokens=16)
        assert baseline.prompt_ids == reply.prompt_ids
        assert reply.output_ids == baseline.output_ids, question
        assert len(reply.output_ids) > 1


def test_a_request_does_not_mutate_the_stored_kv(manual: ManualCacheEngine) -> None:
    first = manual.generate(marked(QUESTIONS[0]), max_new_tokens=8)
    entry = manual.store.entries()[0]
    length = entry.kv.get_seq_length()
    snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in entry.kv.layers]
    again = [manual.generate(marked(QUESTIONS[0]), max_new_tokens=8) for _ in range(2)]
    assert [r.prefix_hit for r in again] == [True, True]
    assert again[0].output_ids == again[1].output_ids == first.output_ids
    assert entry.kv.get_seq_length() == length == entry.num_tokens
    for layer, (keys, values) in zip(entry.kv.layers, snapshot, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_bytes_per_token_formula_matches_the_tensors(manual: ManualCacheEngine) -> None:
    assert kv_bytes_per_token(manual.config) == 2 * 30 * 3 * 64 * 4 == 46_080
    manual.generate(marked(QUESTIONS[0]), max_new_tokens=1)
    check = manual.kv_size_check()
    assert check.ok
    assert check.measured_bytes_per_token == check.formula_bytes_per_token == 46_080
    assert manual.store.bytes_stored() == check.tokens * 46_080


def test_prefix_larger_than_the_store_is_not_stored(manual: ManualCacheEngine) -> None:
    roomy = manual.store
    manual.store = PrefixKVStore(max_tokens=10)
    try:
        replies = [manual.generate(marked(q), max_new_tokens=1) for q in QUESTIONS[:2]]
        assert not any(r.prefix_hit for r in replies)
        assert len(manual.store) == 0 and manual.store.rejected == 2
        assert any("larger than the store" in w for w in replies[0].warnings)
    finally:
        manual.store = roomy


def test_changed_stable_part_is_a_miss_with_the_divergence(manual: ManualCacheEngine) -> None:
    def stamped(second: int, question: str) -> list[dict[str, str]]:
        # The misuse: a timestamp inside the part declared stable.
        system = f"Now: 2026-11-27 09:30:{second:02d} UTC\n{system_prompt(quick=True)}"
        return chat(system + CACHE_MARKER, question)

    first = manual.generate(stamped(5, QUESTIONS[0]), max_new_tokens=1)
    second = manual.generate(stamped(6, QUESTIONS[1]), max_new_tokens=1)
    expected = common_prefix_len(
        first.prompt_ids[: first.prefix_tokens], second.prompt_ids[: second.prefix_tokens]
    )
    assert 0 < expected < second.prefix_tokens
    assert not second.prefix_hit and second.cached_tokens == 0
    assert second.stable_divergence is not None and second.stable_divergence.index == expected
    warning = next(w for w in second.warnings if "stable part changed" in w)
    assert f"token {expected} of {second.prefix_tokens}" in warning
    assert manual.stable_changes == 1 and manual.store.misses == 2
    # A separate stream keeps its own stable part: no warning there.
    other = manual.generate(stamped(5, QUESTIONS[2]), max_new_tokens=1, stream="other")
    assert not any("stable part changed" in w for w in other.warnings)
