"""Hosted providers' caching rules on hand-built logs: minimums, steps, breakpoints, lookback, TTLs, prices.

Token counts are worked out by hand from two facts checked here against bpe-openai itself:
" a" * n (and " b", " c", ...) is n tokens in o200k_base, and "system" / "user" / "assistant"
are one token each. OpenAI prompts add the cookbook framing: 3 tokens + the role per message,
3 tokens priming the reply. Anthropic and Gemini prompts are the text tokens alone.
Prices are read from the shipped data file here, never from the module under test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.providers import (
    DEFAULT_TABLE_PATH,
    PriceTable,
    ProviderRequest,
    Segment,
    count_tokens,
    load_table,
    price,
    simulate,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # bpe-openai loads its tables the old way
    import bpe_openai  # the tokenizer itself, to check the hand counts independently

M = 1_000_000
DATA = json.loads(DEFAULT_TABLE_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_table()


def prices(key: str) -> dict[str, float]:
    return DATA["models"][key]["price"]


def words(letter: str, n: int) -> str:
    """n tokens in o200k_base (checked in test_token_facts)."""
    return f" {letter}" * n


def request(
    *segments: Segment,
    index: int = 0,
    timestamp: float | None = None,
    reference: int | None = None,
    key: str | None = None,
    top_level: str | None = None,
    output: int = 0,
    mode: str | None = None,
) -> ProviderRequest:
    return ProviderRequest(
        line=index + 1,
        session_id=None,
        timestamp=timestamp,
        segments=segments,
        model=None,
        prompt_cache_key=key,
        top_level_cache_control=top_level,
        output_tokens=output,
        reference=reference,
        openai_cache_mode=mode,
    )


def tool(text: str, cache: str | None = None) -> Segment:
    return Segment("tool", text, None, cache)


def system(text: str, cache: str | None = None) -> Segment:
    return Segment("system", text, None, cache)


def msg(role: str, text: str, cache: str | None = None) -> Segment:
    return Segment("message", text, role, cache)


def test_token_facts() -> None:
    enc = bpe_openai.get_encoding("o200k_base")
    for letter in "abcdefg":
        assert len(enc.encode(words(letter, 1300))) == 1300
    for role in ("system", "user", "assistant"):
        assert len(enc.encode(role)) == 1
    assert enc.encode(" a") != enc.encode(" b") != enc.encode(" c")


# --------------------------------------------------------------------------- OpenAI before GPT-5.6


@pytest.mark.parametrize(("text_tokens", "expected_cached"), [(1020, 0), (1021, 1024)])
def test_openai_minimum_1023_vs_1024(table: PriceTable, text_tokens: int, expected_cached: int) -> None:
    # A tool definition (no message framing) + 3 priming tokens: 1,023 or 1,024 prompt tokens.
    same = request(tool(words("a", text_tokens)))
    first, second = simulate("openai:gpt-4.1", [same, same], table)
    assert first.prompt_tokens == second.prompt_tokens == text_tokens + 3
    assert first.cached_tokens == 0
    assert second.cached_tokens == expected_cached
    assert second.cache_write_tokens == 0  # writes are free and unreported before GPT-5.6
    if expected_cached == 0:
        assert "below the 1,024-token minimum: nothing cached" in second.notes
    assert not second.approximate


@pytest.mark.parametrize(("shared", "expected_cached"), [(1300, 1280), (1279, 1152), (1023, 0), (1024, 1024)])
def test_openai_128_token_increments(table: PriceTable, shared: int, expected_cached: int) -> None:
    first = request(tool(words("a", shared)), tool(words("b", 200)))
    second = request(tool(words("a", shared)), tool(words("c", 200)))
    usage = simulate("openai:gpt-4.1", [first, second], table)[1]
    assert usage.prompt_tokens == shared + 200 + 3
    assert usage.cached_tokens == expected_cached


def test_openai_message_framing_follows_the_cookbook(table: PriceTable) -> None:
    prompt = request(system(words("a", 10)), msg("user", words("b", 5)))
    usage = simulate("openai:gpt-4.1", [prompt], table)[0]
    assert usage.prompt_tokens == (3 + 1 + 10) + (3 + 1 + 5) + 3


def test_openai_prompt_cache_key_separates_caches(table: PriceTable) -> None:
    prompt = (tool(words("a", 1500)),)
    usages = simulate(
        "openai:gpt-4.1",
        [request(*prompt, key="alice"), request(*prompt, key="bob"), request(*prompt, key="alice")],
        table,
    )
    assert [u.cached_tokens for u in usages] == [0, 0, 1408]  # 1,503 rounded down to 128s


def test_openai_prefix_expiry_falls_back_to_a_shorter_live_prefix(table: PriceTable) -> None:
    full = request(tool(words("a", 1500)), timestamp=0)
    shorter = request(tool(words("a", 1200)), tool(words("c", 300)), timestamp=1000)
    again = request(tool(words("a", 1500)), tool(words("d", 10)), timestamp=2000)
    usages = simulate("openai:gpt-4.1", [full, shorter, again], table)
    assert [u.cached_tokens for u in usages] == [0, 1152, 1152]  # 1,200 shared -> 9 x 128
    # The full 1,500-token prefix was last used 2,000 s earlier: past its 30 minutes.
    assert "expired: 33.3 min since last use (TTL 30 min)" in usages[2].notes


def test_openai_gpt_5_5_steps_of_2048(table: PriceTable) -> None:
    same = request(tool(words("a", 4200)))
    assert simulate("openai:gpt-5.5", [same, same], table)[1].cached_tokens == 4096


# --------------------------------------------------------------------------- OpenAI GPT-5.6+


def test_openai_breakpoints_implicit_and_explicit(table: PriceTable) -> None:
    p = prices("openai:gpt-6.2-sol")
    # developer message: 3 + 1 + 1030 = 1,034; user message: 3 + 1 + 30 -> ends at 1,068; L = 1,071.
    stable = system(words("a", 1030), cache="5m")  # an explicit breakpoint at 1,034
    first = request(stable, msg("user", words("b", 30)), output=10)
    again = request(stable, msg("user", words("b", 30)))
    other = request(stable, msg("user", words("c", 30)))
    u1, u2, u3 = simulate("openai:gpt-6.2-sol", [first, again, other], table)
    assert (u1.prompt_tokens, u1.cached_tokens, u1.cache_write_tokens) == (1071, 0, 1068)
    assert u1.cost_usd == pytest.approx((1068 * p["cache_write"] + 3 * p["input"] + 10 * p["output"]) / M)
    assert (u2.cached_tokens, u2.cache_write_tokens) == (1068, 0)
    # A new user message: the explicit breakpoint after the stable part is the hit.
    assert (u3.cached_tokens, u3.cache_write_tokens) == (1034, 34)
    assert u3.cost_usd == pytest.approx((1034 * p["cache_read"] + 34 * p["cache_write"] + 3 * p["input"]) / M)


def test_openai_breakpoints_shared_prefix_is_not_a_cached_prefix(table: PriceTable) -> None:
    # Without an explicit breakpoint only the end of the user message is written, so a request
    # with another user message finds no entry at the end of the (unwritten) developer block.
    first = request(system(words("a", 1030)), msg("user", words("b", 30)))
    other = request(system(words("a", 1030)), msg("user", words("c", 30)))
    assert simulate("openai:gpt-6.2-sol", [first, other], table)[1].cached_tokens == 0


def test_openai_breakpoints_minimum_and_lifetime(table: PriceTable) -> None:
    short = request(msg("user", words("a", 1019)))  # message ends at 3 + 1 + 1019 = 1,023
    u = simulate("openai:gpt-6.2-sol", [short, short], table)
    assert [x.cache_write_tokens for x in u] == [0, 0] and u[1].cached_tokens == 0
    assert "below the 1,024-token minimum: nothing cached" in u[1].notes
    long = (msg("user", words("a", 1020)),)  # ends at 1,024
    u = simulate(
        "openai:gpt-6.2-sol",
        [request(*long, timestamp=0), request(*long, timestamp=1800), request(*long, timestamp=3601)],
        table,
    )
    assert [x.cached_tokens for x in u] == [0, 1024, 0]  # 30 min after the read at 1,800 s, plus 1 s
    assert "expired: 30 min since last use (TTL 30 min)" in u[2].notes


# --------------------------------------------------------------------------- Anthropic


@pytest.mark.parametrize(("cached_part", "cached"), [(1023, 0), (1024, 1024)])
def test_anthropic_below_and_at_minimum(table: PriceTable, cached_part: int, cached: int) -> None:
    same = request(system(words("a", cached_part), cache="5m"), msg("user", words("q", 10)))
    first, second = simulate("anthropic:claude-sonnet-4-5", [same, same], table)
    assert first.prompt_tokens == cached_part + 10
    assert first.cache_write_tokens == cached
    assert second.cached_tokens == cached
    assert first.approximate and second.approximate
    if not cached:
        assert "below the 1,024-token minimum: nothing cached" in first.notes


def test_anthropic_minimum_is_per_model(table: PriceTable) -> None:
    same = request(system(words("a", 4095), cache="5m"))
    assert simulate("anthropic:claude-haiku-4-5", [same, same], table)[1].cached_tokens == 0
    assert simulate("anthropic:claude-opus-5-5", [same, same], table)[1].cached_tokens == 4095


def test_anthropic_fifth_breakpoint_is_flagged(table: PriceTable) -> None:
    five = request(*(system(words(letter, 300), cache="5m") for letter in "abcde"))
    usage = simulate("anthropic:claude-sonnet-4-5", [five], table)[0]
    assert "5 breakpoints: the API refuses more than 4 (simulated with the first 4)" in usage.notes
    marked = (system(words(letter, 300), cache="5m") for letter in "abcd")
    four = request(*marked, system("e"), top_level="5m")
    notes = simulate("anthropic:claude-sonnet-4-5", [four], table)[0].notes
    assert any("no slot for the top-level cache_control" in note for note in notes)


def _turn(blocks: int) -> ProviderRequest:
    # Block k (1-based) is 110 tokens; the breakpoint sits on the last block.
    segments = [
        msg("user" if k % 2 else "assistant", words("abcdefg"[k % 7], 110)) for k in range(1, blocks + 1)
    ]
    segments[-1] = Segment("message", segments[-1].text, segments[-1].role, "5m")
    return request(*segments)


@pytest.mark.parametrize("key", ["anthropic:claude-sonnet-4-5", "bedrock:anthropic.claude-sonnet-5"])
def test_anthropic_20_block_lookback(table: PriceTable, key: str) -> None:
    # Turn 1 writes at block 10 (1,100 tokens). Block 29 looks back over blocks 29..10: a hit.
    hit = simulate(key, [_turn(10), _turn(29)], table)[1]
    assert (hit.cached_tokens, hit.cache_write_tokens) == (1100, 29 * 110 - 1100)
    # Block 30 looks back over 30..11: block 10 is the 21st position, outside the window.
    miss = simulate(key, [_turn(10), _turn(30)], table)[1]
    assert (miss.cached_tokens, miss.cache_write_tokens) == (0, 3300)


def test_anthropic_lookback_finds_only_what_was_written(table: PriceTable) -> None:
    # The breakpoint on the changing block: every request writes, none reads.
    first = request(system(words("a", 2000)), msg("user", words("b", 10), cache="5m"))
    second = request(system(words("a", 2000)), msg("user", words("c", 10), cache="5m"))
    u = simulate("anthropic:claude-sonnet-4-5", [first, second], table)
    assert [(x.cached_tokens, x.cache_write_tokens) for x in u] == [(0, 2010), (0, 2010)]


def test_anthropic_ttl_expiry_and_refresh(table: PriceTable) -> None:
    same = (system(words("a", 1200), cache="5m"), msg("user", words("q", 5)))
    expired = simulate(
        "anthropic:claude-sonnet-4-5", [request(*same, timestamp=0), request(*same, timestamp=360)], table
    )[1]
    assert expired.cached_tokens == 0 and expired.cache_write_tokens == 1200
    assert "expired: 6 min since last use (TTL 5 min)" in expired.notes
    # A hit at 4 min refreshes the entry: 8 min after the write it is still there.
    refreshed = simulate(
        "anthropic:claude-sonnet-4-5",
        [request(*same, timestamp=0), request(*same, timestamp=240), request(*same, timestamp=480)],
        table,
    )
    assert [u.cached_tokens for u in refreshed] == [0, 1200, 1200]


def test_anthropic_one_hour_ttl(table: PriceTable) -> None:
    same = (system(words("a", 1200), cache="1h"),)
    u = simulate(
        "anthropic:claude-sonnet-4-5", [request(*same, timestamp=0), request(*same, timestamp=3000)], table
    )
    assert u[1].cached_tokens == 1200


def test_anthropic_cache_multipliers_in_the_data_file() -> None:
    # The documented multipliers, checked on every Anthropic model's published prices.
    cheaper_reads = {"anthropic:claude-opus-5-5": 0.05, "anthropic:claude-sonnet-5-5": 0.05,
                     "anthropic:claude-fable-5-1": 0.025}
    for key, model in DATA["models"].items():
        if not key.startswith("anthropic:"):
            continue
        p = model["price"]
        assert p["cache_write"] == pytest.approx(1.25 * p["input"]), key
        assert p["cache_write_1h"] == pytest.approx(2 * p["input"]), key
        assert p["cache_read"] == pytest.approx(cheaper_reads.get(key, 0.1) * p["input"]), key


def test_anthropic_costs_match_the_data_file(table: PriceTable) -> None:
    p = prices("anthropic:claude-sonnet-4-5")
    five = request(system(words("a", 1200), cache="5m"), msg("user", words("q", 50)), output=100)
    hour = request(system(words("b", 1200), cache="1h"), msg("user", words("q", 50)), output=100)
    w5, r5, w1h = simulate("anthropic:claude-sonnet-4-5", [five, five, hour], table)
    rest = 50 * p["input"] + 100 * p["output"]
    assert w5.cost_usd == pytest.approx((1200 * p["cache_write"] + rest) / M)
    assert r5.cost_usd == pytest.approx((1200 * p["cache_read"] + rest) / M)
    assert w1h.cost_usd == pytest.approx((1200 * p["cache_write_1h"] + rest) / M)
    assert price(
        "anthropic:claude-sonnet-4-5", table, prompt_tokens=1250, cached_tokens=0, cache_write_tokens=1200,
        output_tokens=100, write_ttl="1h",
    ) == pytest.approx(w1h.cost_usd)


def test_anthropic_mixed_ttls_bill_a_b_c(table: PriceTable) -> None:
    p = prices("anthropic:claude-sonnet-4-5")
    mixed = request(system(words("a", 1200), cache="1h"), msg("user", words("b", 300), cache="5m"))
    usage = simulate("anthropic:claude-sonnet-4-5", [mixed], table)[0]
    assert usage.cache_write_tokens == 1500
    assert usage.cost_usd == pytest.approx((1200 * p["cache_write_1h"] + 300 * p["cache_write"]) / M)
    backwards = request(system(words("a", 1200), cache="5m"), msg("user", words("b", 300), cache="1h"))
    notes = simulate("anthropic:claude-sonnet-4-5", [backwards], table)[0].notes
    assert "a 1h breakpoint after a 5m one: the API wants longer TTLs first" in notes


def test_anthropic_top_level_caching_moves_with_the_conversation(table: PriceTable) -> None:
    turn1 = request(system(words("a", 1100)), msg("user", words("b", 20)), top_level="5m")
    turn2 = request(
        system(words("a", 1100)), msg("user", words("b", 20)), msg("assistant", words("c", 20)),
        msg("user", words("d", 20)), top_level="5m",
    )
    u1, u2 = simulate("anthropic:claude-sonnet-4-5", [turn1, turn2], table)
    assert (u1.cached_tokens, u1.cache_write_tokens) == (0, 1120)
    assert (u2.cached_tokens, u2.cache_write_tokens) == (1120, 40)


# --------------------------------------------------------------------------- Gemini


@pytest.mark.parametrize(("tokens", "cached"), [(2047, 0), (2048, 2048)])
def test_gemini_minimum(table: PriceTable, tokens: int, cached: int) -> None:
    same = request(msg("user", words("a", tokens)))
    usage = simulate("gemini:gemini-2.5-flash", [same, same], table)[1]
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (tokens, cached, 0)
    assert usage.approximate
    p = prices("gemini:gemini-2.5-flash")
    assert usage.cost_usd == pytest.approx((cached * p["cache_read"] + (tokens - cached) * p["input"]) / M)


# --------------------------------------------------------------------------- cost_if_extended


def test_cost_if_extended_break_vs_extension(table: PriceTable) -> None:
    p = prices("anthropic:claude-sonnet-4-5")
    stable = system(words("a", 1100), cache="5m")
    first = request(stable, msg("user", words("b", 50)))
    extends = request(
        stable, msg("user", words("b", 50)), msg("assistant", words("c", 20)), msg("user", words("d", 30)),
        index=1, reference=0,
    )
    # The first token of the system prompt changed (a timestamp, say): the cache is lost.
    timestamped = system(words("e", 1) + words("a", 1099), cache="5m")
    broken = request(timestamped, msg("user", words("b", 50)), index=2, reference=0)
    u0, u1, u2 = simulate("anthropic:claude-sonnet-4-5", [first, extends, broken], table)
    assert u0.cost_if_extended_usd == u0.cost_usd  # no reference: nothing to compare with
    assert u1.cost_usd == pytest.approx((1100 * p["cache_read"] + 100 * p["input"]) / M)
    assert u1.cost_if_extended_usd == u1.cost_usd
    assert u2.cost_usd == pytest.approx((1100 * p["cache_write"] + 50 * p["input"]) / M)
    assert u2.cost_if_extended_usd == pytest.approx((1100 * p["cache_read"] + 50 * p["input"]) / M)


def test_cost_if_extended_openai_prefix(table: PriceTable) -> None:
    p = prices("openai:gpt-4.1")
    first = request(tool(words("a", 1500)))
    broken = request(tool(words("b", 1) + words("a", 1499)), index=1, reference=0)
    u = simulate("openai:gpt-4.1", [first, broken], table)[1]
    assert u.cost_usd == pytest.approx(1503 * p["input"] / M)
    assert u.cost_if_extended_usd == pytest.approx((1408 * p["cache_read"] + 95 * p["input"]) / M)


# --------------------------------------------------------------------------- the table


def test_every_entry_names_its_source_and_date() -> None:
    for section in ("models", "rule_sets"):
        for name, entry in DATA[section].items():
            assert entry["source"].startswith("https://"), name
            assert entry["read"].startswith(("2026-11-28", "2026-12-02")), name


def test_prices_override_and_extend(table: PriceTable, tmp_path: Path) -> None:
    assert price("vllm:Qwen/Qwen2.5-7B", table, prompt_tokens=1000, cached_tokens=600) is None
    user = tmp_path / "prices.json"
    user.write_text(json.dumps({"models": {
        "vllm:*": {"price": {"input": 0.5, "cache_read": 0.05, "output": 2.0}},
        "anthropic:claude-sonnet-4-5": {"price": {"input": 1.0, "cache_write": 1.25, "cache_read": 0.1}},
        "openai:my-model": {
            "rules": "openai-pre-5.6", "price": {"input": 4.0, "cache_read": 1.0, "output": 8.0}
        },
    }}))
    mine = load_table(user)
    assert price("vllm:Qwen/Qwen2.5-7B", mine, prompt_tokens=1000, cached_tokens=600, output_tokens=10) == (
        pytest.approx((400 * 0.5 + 600 * 0.05 + 10 * 2.0) / M)
    )
    assert price("sglang:any", mine, prompt_tokens=10, cached_tokens=0) is None  # not overridden
    overridden = price("anthropic:claude-sonnet-4-5", mine, prompt_tokens=100, cached_tokens=0)
    assert overridden == pytest.approx(100 * 1.0 / M)
    # The shipped fields the user left out stay: the minimum still applies.
    assert mine.entry("anthropic:claude-sonnet-4-5").min_tokens == 1024
    same = request(tool(words("a", 1500)))
    assert simulate("openai:my-model", [same, same], mine)[1].cached_tokens == 1408


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"models": {"x:y": {"rules": "no-such-rules"}}}', "models.x:y.rules names no rule set"),
        ('{"models": {"vllm:*": {"price": {"input": -1}}}}', "vllm:*.price.input must be a number >= 0"),
        ('{"models": {"vllm:*": {"price": {"inptu": 1}}}}', "vllm:*.price.inptu is not a price field"),
        ('{"models": {"novendor": {"rules": "anthropic"}}}', "novendor must be named 'provider:model'"),
        ('{"pricing": {}}', "unknown top-level key 'pricing'"),
        ('{"rule_sets": {"anthropic": {"family": "magic"}}}', "rule_sets.anthropic.family must be one of"),
    ],
)
def test_bad_prices_file_is_one_line_user_error(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(UserError) as caught:
        load_table(bad)
    text = str(caught.value)
    assert message in text and str(bad) in text and "\n" not in text


def test_missing_prices_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such prices file"):
        load_table(tmp_path / "nope.json")


def test_unknown_provider_model(table: PriceTable) -> None:
    # An unknown provider lists the providers, not every model of every provider.
    with pytest.raises(UserError) as caught:
        simulate("x:y", [], table)
    message = str(caught.value)
    assert message.startswith("unknown provider 'x'; providers: anthropic, azure, bedrock, deepseek, ")
    assert ":" not in message.split("providers: ")[1].split(" (")[0] and "\n" not in message
    with pytest.raises(UserError, match="unknown provider 'gpt-4.1'; providers: "):
        price("gpt-4.1", table, prompt_tokens=1, cached_tokens=0)
    # A known provider with an unknown model lists that provider's models only.
    with pytest.raises(UserError) as caught:
        table.entry("deepseek:deepseek-chat")
    assert str(caught.value) == (
        "unknown provider/model 'deepseek:deepseek-chat'; deepseek models: "
        "deepseek:deepseek-flash, deepseek:deepseek-v4-pro"
    )
    with pytest.raises(UserError, match="expected 'provider' or 'provider:model', got ':gpt-4.1'"):
        table.entry(":gpt-4.1")


def test_engines_are_left_to_the_explainer(table: PriceTable) -> None:
    with pytest.raises(UserError, match="self-hosted engine"):
        simulate("vllm:Qwen/Qwen2.5-7B", [request(tool("x"))], table)


def test_count_tokens_exact_for_openai_approximate_elsewhere(table: PriceTable) -> None:
    assert count_tokens("openai:gpt-6.2-sol", "Hello world", table) == (2, False)
    cl100k = len(bpe_openai.get_encoding("cl100k_base").encode(words("a", 100) + "!?"))
    assert count_tokens("openai:gpt-4", words("a", 100) + "!?", table) == (cl100k, False)
    assert count_tokens("anthropic:claude-opus-5-5", "Hello world", table) == (2, True)


def test_long_context_rates_apply_above_the_threshold(table: PriceTable) -> None:
    short = price("anthropic:claude-haiku-5-5", table, prompt_tokens=100_000, cached_tokens=0)
    long = price("anthropic:claude-haiku-5-5", table, prompt_tokens=100_001, cached_tokens=0)
    data = DATA["models"]["anthropic:claude-haiku-5-5"]
    assert short == pytest.approx(100_000 * data["price"]["input"] / M)
    assert long == pytest.approx(100_001 * data["long_context"]["input"] / M)


def test_missing_price_gives_none(table: PriceTable) -> None:
    # Gemini 3.1 Pro has no cached-token price in the table: a request that reads the cache has no cost.
    assert price("gemini:gemini-3.1-pro-preview", table, prompt_tokens=5000, cached_tokens=0) is not None
    assert price("gemini:gemini-3.1-pro-preview", table, prompt_tokens=5000, cached_tokens=4096) is None


# --------------------------------------------------------------------------- --provider NAME: defaults


def test_every_provider_default_is_a_model_of_that_provider(table: PriceTable) -> None:
    for provider, info in DATA["providers"].items():
        assert info["why"], provider
        assert table.entry(provider).key == f"{provider}:{info['default']}"
        assert f"{provider}:{info['default']}" in DATA["models"]
    # Every hosted provider of the table has a default; the engines answer with their wildcard.
    hosted = {key.split(":")[0] for key in DATA["models"]} - {"vllm", "sglang"}
    assert hosted == set(DATA["providers"])
    assert table.entry("vllm").key == "vllm:*" and table.entry("sglang").key == "sglang:*"


def test_all_still_prices_the_three_original_defaults(table: PriceTable) -> None:
    from harness.explain.costs import ENGINES, expand

    hosted = [table.entry(name).key for name in expand(["all"]) if name not in ENGINES]
    assert hosted == ["openai:gpt-6.2-sol", "anthropic:claude-sonnet-5-5", "gemini:gemini-3.8-flash"]


def test_a_user_file_adds_a_provider_and_its_default(tmp_path: Path) -> None:
    user = tmp_path / "prices.json"
    user.write_text(json.dumps({
        "models": {"acme:m1": {"rules": "openai-pre-5.6", "price": {"input": 1.0}},
                   "acme:m2": {"rules": "openai-pre-5.6", "price": {"input": 2.0}}},
        "providers": {"acme": {"default": "m2"}, "openai": {"default": "gpt-4.1"}},
    }))
    mine = load_table(user)
    assert mine.entry("acme").key == "acme:m2"
    assert mine.entry("openai").key == "openai:gpt-4.1"  # the user's default wins
    user.write_text(json.dumps({"models": {"acme:m1": {"rules": "openai-pre-5.6"}}}))
    with pytest.raises(UserError, match="'acme' has no default model in the table; name one: acme:m1$"):
        load_table(user).entry("acme")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"providers": {"openai": {"default": "nope"}}}',
         "providers.openai.default names no model 'openai:nope'"),
        ('{"providers": {"openai": "gpt-4.1"}}', "providers.openai must be an object"),
        ('{"rule_sets": {"xai": {"boundary": "word"}}}',
         "rule_sets.xai.boundary must be one of token, message"),
        ('{"rule_sets": {"kimi": {"write_ttl": "2h"}}}',
         "rule_sets.kimi.write_ttl must be one of 5m, 1h, 30m"),
        ('{"rule_sets": {"qwen-explicit": {"without_breakpoints": "nope"}}}',
         "rule_sets.qwen-explicit.without_breakpoints names no rule set"),
        ('{"rule_sets": {"bedrock-nova": {"tool_breakpoints": "no"}}}',
         "rule_sets.bedrock-nova.tool_breakpoints must be true or false"),
        ('{"rule_sets": {"mistral": {"read_ratio": -0.1}}}',
         "rule_sets.mistral.read_ratio must be a number >= 0"),
    ],
)
def test_bad_provider_and_rule_fields_are_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(UserError) as caught:
        load_table(bad)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cli_provider_without_a_model_names_the_resolved_model(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import validate

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "e.json"
    result = subprocess.run(
        [sys.executable, "-m", "harness.explain", "examples/agent_tools_log.jsonl", "--chat-template",
         "examples/chatml_tools.jinja", "--provider", "deepseek,zai", "--json", str(out)],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "deepseek:deepseek-flash" in result.stdout and "zai:glm-5" in result.stdout
    document = json.loads(out.read_text())
    validate("explain", document)
    assert list(document["cost"]) == ["deepseek:deepseek-flash", "zai:glm-5"]


# --------------------------------------------------------------------------- DeepSeek: disk units


def test_deepseek_common_prefix_is_read_by_the_third_request(table: PriceTable) -> None:
    # A + B, A + C: both miss (A + C does not fully match the unit A + B); A is persisted as the
    # common prefix, so A + D reads it. A is 1,000 tokens, each question 20.
    p = prices("deepseek:deepseek-flash")
    stable = system(words("a", 1000))
    u = simulate(
        "deepseek:deepseek-flash",
        [request(stable, msg("user", words(q, 20))) for q in "bcd"],
        table,
    )
    assert [x.cached_tokens for x in u] == [0, 0, 1000]
    assert [x.cache_write_tokens for x in u] == [0, 0, 0]  # writes are free
    assert "shares 1,000 tokens with an earlier prompt" in u[1].notes[0]
    assert u[2].cost_usd == pytest.approx((1000 * p["cache_read"] + 20 * p["input"]) / M)
    assert u[2].approximate


def test_deepseek_a_unit_is_read_only_in_full(table: PriceTable) -> None:
    # The unit is the whole first prompt (1,020 tokens); a prompt that stops 10 tokens short of it
    # shares 1,010 tokens but reads nothing, unlike an automatic prefix cache.
    first = request(system(words("a", 1000)), msg("user", words("b", 20)))
    shorter = request(system(words("a", 1000)), msg("user", words("b", 10)))
    u = simulate("deepseek:deepseek-flash", [first, shorter, shorter], table)
    assert [x.cached_tokens for x in u] == [0, 0, 1010]
    assert simulate("zai:glm-5", [first, shorter], table)[1].cached_tokens == 1010


@pytest.mark.parametrize(("output", "cached"), [(5, 1050), (0, 1020)])
def test_deepseek_the_reply_resent_ends_an_output_unit(table: PriceTable, output: int, cached: int) -> None:
    # Turn 1: A (1,000) + B (20), answered with output tokens. Turn 2 re-sends the reply E (30)
    # and asks F: the unit at the end of the output covers A + B + E = 1,050 tokens. Without a
    # logged reply (0 output tokens) only the input unit A + B = 1,020 is there.
    turn1 = request(system(words("a", 1000)), msg("user", words("b", 20)), output=output)
    turn2 = request(
        system(words("a", 1000)), msg("user", words("b", 20)), msg("assistant", words("e", 30)),
        msg("user", words("f", 20)),
    )
    u = simulate("deepseek:deepseek-v4-pro", [turn1, turn2], table)[1]
    p = prices("deepseek:deepseek-v4-pro")
    assert (u.prompt_tokens, u.cached_tokens) == (1070, cached)
    assert u.cost_usd == pytest.approx((cached * p["cache_read"] + (1070 - cached) * p["input"]) / M)


def test_deepseek_a_reply_first_or_an_empty_prompt(table: PriceTable) -> None:
    opening = request(msg("assistant", words("a", 300)), msg("user", words("b", 10)), output=3)
    u = simulate("deepseek:deepseek-flash", [opening, opening, request()], table)
    assert [(x.prompt_tokens, x.cached_tokens) for x in u] == [(310, 0), (310, 310), (0, 0)]


def test_deepseek_units_do_not_expire_in_the_simulation(table: PriceTable) -> None:
    same = (system(words("a", 300)),)
    ten_days = 10 * 24 * 3600
    log = [request(*same, timestamp=0), request(*same, timestamp=ten_days)]
    u = simulate("deepseek:deepseek-flash", log, table)
    assert u[1].cached_tokens == 300


# --------------------------------------------------------------------------- Amazon Bedrock


@pytest.mark.parametrize(
    ("key", "minimum"),
    [("bedrock:anthropic.claude-opus-5", 512), ("bedrock:anthropic.claude-sonnet-5", 1024),
     ("bedrock:anthropic.claude-haiku-4-5-20251001-v1:0", 4096), ("bedrock:amazon.nova-2-lite-v1:0", 1000)],
)
def test_bedrock_checkpoint_minimum_per_model(table: PriceTable, key: str, minimum: int) -> None:
    for size, cached in ((minimum - 1, 0), (minimum, minimum)):
        same = request(system(words("a", size), cache="5m"), msg("user", words("q", 5)))
        first, second = simulate(key, [same, same], table)
        assert (first.cache_write_tokens, second.cached_tokens) == (cached, cached), (key, size)


def test_bedrock_nova_has_no_lookback_and_no_tool_checkpoints(table: PriceTable) -> None:
    # Turn 1 writes at the system prompt's end (1,100) and at the question's (1,110). Turn 2 asks
    # another question with a checkpoint only on it: Claude looks back and reads 1,100; Nova
    # checks the checkpoint's own position only, and writes all 1,110 again.
    first = request(system(words("a", 1100), cache="5m"), msg("user", words("b", 10), cache="5m"))
    second = request(system(words("a", 1100)), msg("user", words("c", 10), cache="5m"))
    claude = simulate("bedrock:anthropic.claude-sonnet-5", [first, second], table)[1]
    nova = simulate("bedrock:amazon.nova-2-lite-v1:0", [first, second], table)[1]
    assert (claude.cached_tokens, claude.cache_write_tokens) == (1100, 10)
    assert (nova.cached_tokens, nova.cache_write_tokens) == (0, 1110)
    on_tool = request(tool(words("a", 1200), cache="5m"), msg("user", words("b", 10)))
    notes = simulate("bedrock:amazon.nova-2-lite-v1:0", [on_tool], table)[0].notes
    assert "a breakpoint on tool definition 1: not accepted there, ignored" in notes


def test_bedrock_nova_five_minutes_only_and_no_write_price(table: PriceTable) -> None:
    p = prices("bedrock:amazon.nova-2-lite-v1:0")
    same = (system(words("a", 1000), cache="1h"), msg("user", words("q", 10)))
    u = simulate(
        "bedrock:amazon.nova-2-lite-v1:0",
        [request(*same, timestamp=0), request(*same, timestamp=240), request(*same, timestamp=600)],
        table,
    )
    assert "a 1h breakpoint where only 5-minute caching is offered: written for 5 minutes" in u[0].notes
    assert [x.cached_tokens for x in u] == [0, 1000, 0]  # 360 s after the read at 240 s: gone
    assert "expired: 6 min since last use (TTL 5 min)" in u[2].notes
    assert u[0].cost_usd is None  # a write, and the table has no Nova write price
    assert u[1].cost_usd == pytest.approx((1000 * p["cache_read"] + 10 * p["input"]) / M)


def test_bedrock_claude_one_hour_write_price(table: PriceTable) -> None:
    p = prices("bedrock:anthropic.claude-sonnet-5")
    same = (system(words("a", 1200), cache="1h"), msg("user", words("q", 30)))
    log = [request(*same, timestamp=0), request(*same, timestamp=3000)]
    u = simulate("bedrock:anthropic.claude-sonnet-5", log, table)
    assert u[0].cost_usd == pytest.approx((1200 * p["cache_write_1h"] + 30 * p["input"]) / M)
    assert u[1].cost_usd == pytest.approx((1200 * p["cache_read"] + 30 * p["input"]) / M)


# --------------------------------------------------------------------------- Azure OpenAI


def test_azure_before_gpt_5_6_in_memory_lifetime(table: PriceTable) -> None:
    # 1,500 text tokens + 3 priming = 1,503: 11 steps of 128 = 1,408. Reads at 600 s (10 min after
    # the write) and not at 1,201 s (601 s after that read).
    p = prices("azure:gpt-4.1")
    same = (tool(words("a", 1500)),)
    u = simulate(
        "azure:gpt-4.1",
        [request(*same, timestamp=0), request(*same, timestamp=600), request(*same, timestamp=1201)],
        table,
    )
    assert [x.cached_tokens for x in u] == [0, 1408, 0]
    assert "expired: 10 min since last use (TTL 10 min)" in u[2].notes
    assert u[1].cost_usd == pytest.approx((1408 * p["cache_read"] + 95 * p["input"]) / M)
    assert not u[1].approximate  # Azure serves OpenAI's models: o200k_base counts are exact


def test_azure_gpt_5_6_breakpoints(table: PriceTable) -> None:
    # The scenario of test_openai_breakpoints_implicit_and_explicit, at Azure's gpt-5.6-luna prices.
    p = prices("azure:gpt-5.6-luna")
    stable = system(words("a", 1030), cache="5m")
    first = request(stable, msg("user", words("b", 30)), output=10)
    other = request(stable, msg("user", words("c", 30)))
    u1, u2 = simulate("azure:gpt-5.6-luna", [first, other], table)
    assert (u1.prompt_tokens, u1.cached_tokens, u1.cache_write_tokens) == (1071, 0, 1068)
    assert u1.cost_usd == pytest.approx((1068 * p["cache_write"] + 3 * p["input"] + 10 * p["output"]) / M)
    assert (u2.cached_tokens, u2.cache_write_tokens) == (1034, 34)


# --------------------------------------------------------------------------- xAI


def test_xai_reads_whole_matching_messages_only(table: PriceTable) -> None:
    # System 500 + user 100; the next user message keeps its first 60 tokens and changes the rest.
    # xAI serves the 500 tokens of the matching system message; a token-granular cache (Z.ai) 560.
    first = request(system(words("a", 500)), msg("user", words("b", 100)))
    second = request(system(words("a", 500)), msg("user", words("b", 60) + words("c", 40)))
    u = simulate("xai:grok-4.7", [first, second], table)[1]
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens) == (600, 500, 0)
    p = prices("xai:grok-4.7")
    assert u.cost_usd == pytest.approx((500 * p["cache_read"] + 100 * p["input"]) / M)
    assert simulate("zai:glm-5", [first, second], table)[1].cached_tokens == 560
    tiny = request(msg("user", words("a", 5)))
    assert simulate("xai:grok-4.7", [tiny, tiny], table)[1].cached_tokens == 5  # no minimum stated


def test_xai_long_context_rates_from_200k(table: PriceTable) -> None:
    data = DATA["models"]["xai:grok-4.7"]
    below = price("xai:grok-4.7", table, prompt_tokens=199_999, cached_tokens=0)
    at = price("xai:grok-4.7", table, prompt_tokens=200_000, cached_tokens=0)
    assert below == pytest.approx(199_999 * data["price"]["input"] / M)
    assert at == pytest.approx(200_000 * data["long_context"]["input"] / M)


# --------------------------------------------------------------------------- Mistral


@pytest.mark.parametrize(("shared", "cached"), [(63, 0), (64, 64), (127, 64), (200, 192)])
def test_mistral_64_token_blocks(table: PriceTable, shared: int, cached: int) -> None:
    first = request(tool(words("a", shared)), tool(words("b", 50)))
    second = request(tool(words("a", shared)), tool(words("c", 50)))
    u = simulate("mistral:mistral-large-latest", [first, second], table)[1]
    assert (u.prompt_tokens, u.cached_tokens) == (shared + 50, cached)
    # Cached tokens at 10% of the input price (the page's rule; the model lists no cache_read).
    p = prices("mistral:mistral-large-latest")
    assert "cache_read" not in p
    assert u.cost_usd == pytest.approx((cached * 0.1 * p["input"] + (shared + 50 - cached) * p["input"]) / M)


# --------------------------------------------------------------------------- Alibaba Qwen


@pytest.mark.parametrize(("size", "cached"), [(255, 0), (256, 256)])
def test_qwen_implicit_cache_from_256_tokens(table: PriceTable, size: int, cached: int) -> None:
    same = request(msg("user", words("a", size)))
    u = simulate("qwen:qwen3-max", [same, same], table)[1]
    assert (u.cached_tokens, u.cache_write_tokens) == (cached, 0)
    p = prices("qwen:qwen3-max")
    assert u.cost_usd == pytest.approx((cached * 0.2 * p["input"] + (size - cached) * p["input"]) / M)


@pytest.mark.parametrize(("size", "cached"), [(1023, 0), (1024, 1024)])
def test_qwen_explicit_cache_from_1024_tokens(table: PriceTable, size: int, cached: int) -> None:
    same = request(system(words("a", size), cache="5m"), msg("user", words("q", 10)))
    first, second = simulate("qwen:qwen3-max", [same, same], table)
    assert (first.cache_write_tokens, second.cached_tokens) == (cached, cached)
    p = prices("qwen:qwen3-max")
    rest = (size - cached + 10) * p["input"]
    assert first.cost_usd == pytest.approx((cached * 1.25 * p["input"] + rest) / M)
    assert second.cost_usd == pytest.approx((cached * 0.1 * p["input"] + rest) / M)


def test_qwen_explicit_and_implicit_caches_are_separate(table: PriceTable) -> None:
    # Without a marker the implicit cache serves the request; with one, the explicit cache, which
    # is empty: it writes. The third request (no marker) reads the implicit entry of the first.
    plain = request(system(words("a", 1100)), msg("user", words("b", 10)))
    marked = request(system(words("a", 1100), cache="5m"), msg("user", words("b", 10)))
    u = simulate("qwen:qwen3-max", [plain, marked, plain], table)
    assert [(x.cached_tokens, x.cache_write_tokens) for x in u] == [(0, 0), (0, 1100), (1110, 0)]


def test_qwen_keeps_the_last_four_markers(table: PriceTable) -> None:
    # Five markers at 300, 600, ..., 1,500 tokens. Alibaba keeps the last four (600..1,500), of which
    # 1,200 and 1,500 reach the 1,024 minimum: 1,500 written. Anthropic refuses the request; simulated
    # with the first four (300..1,200): 1,200 written.
    five = request(*(system(words(letter, 300), cache="5m") for letter in "abcde"))
    qwen = simulate("qwen:qwen3-max", [five], table)[0]
    assert qwen.cache_write_tokens == 1500
    assert "5 breakpoints: only the last 4 take effect" in qwen.notes
    assert simulate("anthropic:claude-sonnet-4-5", [five], table)[0].cache_write_tokens == 1200


def test_qwen_explicit_entries_live_five_minutes(table: PriceTable) -> None:
    same = (system(words("a", 1100), cache="5m"),)
    u = simulate(
        "qwen:qwen3-max",
        [request(*same, timestamp=0), request(*same, timestamp=299), request(*same, timestamp=600)],
        table,
    )
    assert [x.cached_tokens for x in u] == [0, 1100, 0]  # 301 s after the hit at 299 s


def test_qwen_prices_above_32k_are_unknown(table: PriceTable) -> None:
    assert price("qwen:qwen3-max", table, prompt_tokens=32_000, cached_tokens=0) == pytest.approx(
        32_000 * prices("qwen:qwen3-max")["input"] / M
    )
    assert price("qwen:qwen3-max", table, prompt_tokens=32_001, cached_tokens=0) is None


# --------------------------------------------------------------------------- Moonshot Kimi


@pytest.mark.parametrize(("size", "cached"), [(256, 0), (257, 257)])
def test_kimi_minimum_and_paid_writes(table: PriceTable, size: int, cached: int) -> None:
    p = prices("moonshot:kimi-k3")
    same = request(msg("user", words("a", size)))
    first, second = simulate("moonshot:kimi-k3", [same, same], table)
    assert (first.cache_write_tokens, second.cached_tokens, second.cache_write_tokens) == (cached, cached, 0)
    assert first.cost_usd == pytest.approx((cached * p["cache_write"] + (size - cached) * p["input"]) / M)
    assert second.cost_usd == pytest.approx((cached * p["cache_read"] + (size - cached) * p["input"]) / M)


def test_kimi_grows_writes_the_new_part_and_ignores_the_key(table: PriceTable) -> None:
    p = prices("moonshot:kimi-k3")
    first = request(system(words("a", 1000)), key="alice")
    grown = request(system(words("a", 1000)), msg("user", words("b", 100)), key="bob")
    u = simulate("moonshot:kimi-k3", [first, grown], table)[1]
    assert (u.cached_tokens, u.cache_write_tokens) == (1000, 100)  # one cache per organization
    assert u.cost_usd == pytest.approx((1000 * p["cache_read"] + 100 * p["cache_write"]) / M)


def test_kimi_five_minute_lifetime(table: PriceTable) -> None:
    same = (msg("user", words("a", 300)),)
    u = simulate("moonshot:kimi-k3", [request(*same, timestamp=0), request(*same, timestamp=301)], table)
    assert (u[1].cached_tokens, u[1].cache_write_tokens) == (0, 300)
    assert "expired: 5 min since last use (TTL 5 min)" in u[1].notes


# --------------------------------------------------------------------------- Z.ai GLM


def test_zai_token_granular_without_a_minimum(table: PriceTable) -> None:
    p = prices("zai:glm-5")
    first = request(system(words("a", 500)), msg("user", words("b", 100)))
    second = request(system(words("a", 500)), msg("user", words("b", 60) + words("c", 40)))
    u = simulate("zai:glm-5", [first, second], table)[1]
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens) == (600, 560, 0)
    assert u.cost_usd == pytest.approx((560 * p["cache_read"] + 40 * p["input"]) / M)
    tiny = request(msg("user", words("a", 5)))
    assert simulate("zai:glm-5", [tiny, tiny], table)[1].cached_tokens == 5


def test_sequence_store_equals_its_definition_on_random_prompts() -> None:
    """The chunk tree against the definition it replaced: the longest common prefix with any live
    stored prompt, and the longest expired one beyond it (with when it was last used)."""
    import random

    from harness.providers.cache import SequenceStore, _Entry

    rng = random.Random(3)
    for chunk in (1, 3, 64, 8):
        SequenceStore.CHUNK, original = chunk, SequenceStore.CHUNK
        try:
            store, seen = SequenceStore(), {}
            for step in range(250):
                now = float(step)
                if seen and rng.random() < 0.7:
                    base = list(rng.choice(list(seen)))
                    cut = rng.randint(0, len(base))
                    tokens = tuple(base[:cut] + [rng.randint(-3, 4) for _ in range(rng.randint(0, 9))])
                else:
                    tokens = tuple(rng.randint(-3, 4) for _ in range(rng.randint(0, 140)))
                live = max(
                    (common(tokens, t) for t, e in seen.items() if e.live(now)), default=0
                )
                dead = max((common(tokens, t) for t, e in seen.items() if not e.live(now)), default=0)
                got_live, _, got_dead, entry = store.best(tokens, now)
                assert got_live == live
                assert got_dead == (dead if dead > live else 0)
                if got_dead:
                    assert entry is not None and not entry.live(now)
                ttl = 20.0  # one rule set, one lifetime
                store.add(tokens, now, ttl)
                seen[tokens] = _Entry(ttl, now)
        finally:
            SequenceStore.CHUNK = original


def common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_provider_names_resolve_to_one_provider_model_each() -> None:
    """``--provider all,openai:<its default>`` prices the default once; a provider alone is written
    as its default model (the name the tables show); ``--price-as`` the same."""
    from harness.cli import check_price_as
    from harness.explain.costs import resolve

    table = load_table()
    default = table.entry("openai").key
    assert default.startswith("openai:") and default != "openai:*"
    names = resolve(["all", default, "openai"], table)
    assert names[:2] == ["vllm", "sglang"]
    assert names.count(default) == 1
    assert len(names) == len(set(names)) == 5  # the engines, then openai, anthropic, gemini defaults
    assert all(":" in name for name in names[2:])
    assert check_price_as("openai") == default
    with pytest.raises(UserError, match="nobody"):
        resolve(["nobody:x"], table)
