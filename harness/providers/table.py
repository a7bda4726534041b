"""The table of caching rules and prices: ``harness/data/providers.json``, plus a user's ``--prices`` file.

Two kinds of entries, both keyed by name:

``rule_sets``
    How one provider (or one model generation) caches: the ``family`` the simulation implements
    (``openai_breakpoints``, ``openai_prefix``, ``anthropic``, ``gemini_implicit``, ``engine``,
    ``none``) and its numbers (minimum, step, lifetime, breakpoint limits).
``models``
    ``"provider:model"`` -> which rule set, the model's own minimum when it has one, the tokenizer
    to count with, and list prices in USD per million tokens. ``"provider:*"`` matches any model
    of that provider (the self-hosted engines).

A user file has the same shape. It is merged entry by entry: a model or rule set it names gets
the user's fields over the shipped ones (so ``{"models": {"vllm:*": {"price": {...}}}}`` only
adds a price), a name the table lacks is added and must then be complete. Anything malformed is
a one-line ``UserError`` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError

DEFAULT_TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "providers.json"
FAMILIES = ("openai_breakpoints", "openai_prefix", "anthropic", "gemini_implicit", "engine", "none")
FRAMINGS = ("openai_chat", "none")
PRICE_FIELDS = ("input", "output", "cache_read", "cache_write", "cache_write_1h")
TOKENS_PER_MILLION = 1_000_000
# Write TTLs a caller may name; "30m" is OpenAI GPT-5.6+'s only lifetime and is billed like a 5m write.
WRITE_TTLS = ("5m", "1h", "30m")


@dataclass(frozen=True)
class Prices:
    """USD per million tokens; ``None`` where the table has no price for that kind of token."""

    input: float | None = None
    output: float | None = None
    cache_read: float | None = None
    cache_write: float | None = None  # the default write (Anthropic 5m, OpenAI 30m)
    cache_write_1h: float | None = None

    def write_rate(self, ttl: str) -> float | None:
        return self.cache_write_1h if ttl == "1h" else self.cache_write


@dataclass(frozen=True)
class LongContext:
    """Rates that apply to the whole request when its prompt has more than ``above_tokens`` tokens."""

    above_tokens: int
    prices: Prices


@dataclass(frozen=True)
class RuleSet:
    name: str
    family: str
    framing: str  # "openai_chat": OpenAI's per-message tokens are counted; "none": text only
    min_tokens: int  # the rule set's minimum; a model entry may override it
    interval: int  # openai_prefix: cached tokens come in steps of this many
    ttl_seconds: float | None  # None: nothing expires
    ttl_by_label: Mapping[str, float]  # anthropic: {"5m": 300, "1h": 3600}
    max_breakpoints: int
    lookback_blocks: int
    max_writes: int
    earlier_message_endings: int
    explicit_first: int
    explicit_latest: int
    block_size: int | None  # engines: tokens per cache block (None: from the engine)
    source: str
    read: str
    notes: str
    unverified: tuple[str, ...]


@dataclass(frozen=True)
class ModelEntry:
    key: str  # "provider:model" as written in the table ("vllm:*" for a wildcard)
    rules: RuleSet
    encoding: str  # the tiktoken-style encoding tokens are counted in
    exact_tokens: bool  # False: the provider's tokenizer is not available offline, counts approximate
    min_tokens: int
    prices: Prices | None  # None: no list price (self-hosted)
    long_context: LongContext | None
    source: str
    read: str
    notes: str
    unverified: tuple[str, ...]

    @property
    def provider(self) -> str:
        return self.key.split(":", 1)[0]


@dataclass(frozen=True)
class PriceTable:
    models: Mapping[str, ModelEntry]
    rule_sets: Mapping[str, RuleSet]
    files: tuple[Path, ...]  # the shipped table, then the user's file if any

    def known(self) -> tuple[str, ...]:
        return tuple(sorted(self.models))

    def entry(self, provider_model: str) -> ModelEntry:
        """The entry for ``provider:model``, falling back to ``provider:*``."""
        provider, sep, model = provider_model.partition(":")
        if not sep or not provider or not model:
            raise UserError(
                f"expected 'provider:model', got '{provider_model}'; known: {', '.join(self.known())}"
            )
        found = self.models.get(provider_model) or self.models.get(f"{provider}:*")
        if found is None:
            raise UserError(f"unknown provider/model '{provider_model}'; known: {', '.join(self.known())}")
        return found


# --------------------------------------------------------------------------- loading


def load_table(path: Path | None = None) -> PriceTable:
    """The shipped table, overridden and extended entry by entry by ``path`` (a ``--prices`` file)."""
    shipped = _read_json(DEFAULT_TABLE_PATH)
    files = [DEFAULT_TABLE_PATH]
    origin_models = dict.fromkeys(_section(shipped, "models", DEFAULT_TABLE_PATH), DEFAULT_TABLE_PATH)
    origin_rules = dict.fromkeys(_section(shipped, "rule_sets", DEFAULT_TABLE_PATH), DEFAULT_TABLE_PATH)
    models = dict(_section(shipped, "models", DEFAULT_TABLE_PATH))
    rule_sets = dict(_section(shipped, "rule_sets", DEFAULT_TABLE_PATH))
    if path is not None:
        path = Path(path)
        user = _read_json(path)
        unknown = sorted(set(user) - {"schema", "about", "models", "rule_sets"})
        if unknown:
            raise UserError(
                f"{path}: unknown top-level key '{unknown[0]}' (expected 'models' and/or 'rule_sets')"
            )
        if "models" not in user and "rule_sets" not in user:
            raise UserError(f"{path}: no 'models' or 'rule_sets' to add")
        sections = ((models, origin_models, "models"), (rule_sets, origin_rules, "rule_sets"))
        for target, origin, section in sections:
            for name, fields in _section(user, section, path).items():
                if not isinstance(fields, dict):
                    raise UserError(f"{path}: {section}.{name} must be an object")
                # Entry by entry: the user's fields win, the shipped ones fill the rest.
                target[name] = {**target.get(name, {}), **fields}
                origin[name] = path
        files.append(path)
    built_rules = {name: _rule_set(name, raw, origin_rules[name]) for name, raw in rule_sets.items()}
    built_models = {
        name: _model(name, raw, built_rules, origin_models[name]) for name, raw in models.items()
    }
    return PriceTable(built_models, built_rules, tuple(files))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no such prices file: {path}") from None
    except IsADirectoryError:
        raise UserError(f"not a file: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise UserError(f"{path}: not valid JSON ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _section(data: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{name}' must be an object")
    return value


def _bad(path: Path, where: str, problem: str) -> UserError:
    return UserError(f"{path}: {where} {problem}")


def _number(value: Any, path: Path, where: str, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    # bool is an int in Python; a price of `true` is a typo, not a number.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _bad(path, where, f"must be a number >= 0, got {json.dumps(value)}")
    return float(value)


def _count(value: Any, path: Path, where: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(path, where, f"must be a whole number >= 0, got {json.dumps(value)}")
    return value


def _text(value: Any, path: Path, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(path, where, f"must be a string, got {json.dumps(value)}")
    return value


def _strings(value: Any, path: Path, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(path, where, "must be a string or a list of strings")
    return tuple(value)


def _rule_set(name: str, raw: Mapping[str, Any], path: Path) -> RuleSet:
    where = f"rule_sets.{name}"
    family = raw.get("family")
    if family not in FAMILIES:
        raise _bad(path, f"{where}.family", f"must be one of {', '.join(FAMILIES)}, got {json.dumps(family)}")
    framing = raw.get("framing", "none")
    if framing not in FRAMINGS:
        choices = ", ".join(FRAMINGS)
        raise _bad(path, f"{where}.framing", f"must be one of {choices}, got {json.dumps(framing)}")
    ttl = raw.get("ttl_seconds")
    ttl_by_label: dict[str, float] = {}
    ttl_seconds: float | None
    if isinstance(ttl, dict):
        for label, seconds in ttl.items():
            value = _number(seconds, path, f"{where}.ttl_seconds.{label}", allow_none=False)
            assert value is not None  # allow_none=False
            ttl_by_label[label] = value
        ttl_seconds = None
    else:
        ttl_seconds = _number(ttl, path, f"{where}.ttl_seconds")
    interval = _count(raw.get("interval"), path, f"{where}.interval", 1)
    if interval == 0:
        raise _bad(path, f"{where}.interval", "must be at least 1")
    block_size = raw.get("block_size")
    if block_size is not None:
        block_size = _count(block_size, path, f"{where}.block_size", 1)
    if family == "anthropic" and set(ttl_by_label) != {"5m", "1h"}:
        raise _bad(path, f"{where}.ttl_seconds", 'must give seconds for both "5m" and "1h"')
    return RuleSet(
        name=name,
        family=family,
        framing=framing,
        min_tokens=_count(raw.get("min_tokens"), path, f"{where}.min_tokens", 0),
        interval=interval,
        ttl_seconds=ttl_seconds,
        ttl_by_label=ttl_by_label,
        max_breakpoints=_count(raw.get("max_breakpoints"), path, f"{where}.max_breakpoints", 4),
        lookback_blocks=_count(raw.get("lookback_blocks"), path, f"{where}.lookback_blocks", 20),
        max_writes=_count(raw.get("max_writes"), path, f"{where}.max_writes", 4),
        earlier_message_endings=_count(
            raw.get("earlier_message_endings"), path, f"{where}.earlier_message_endings", 20
        ),
        explicit_first=_count(raw.get("explicit_first"), path, f"{where}.explicit_first", 2),
        explicit_latest=_count(raw.get("explicit_latest"), path, f"{where}.explicit_latest", 50),
        block_size=block_size,
        source=_text(raw.get("source"), path, f"{where}.source"),
        read=_text(raw.get("read"), path, f"{where}.read"),
        notes=_text(raw.get("notes"), path, f"{where}.notes"),
        unverified=_strings(raw.get("unverified"), path, f"{where}.unverified"),
    )


def _prices(raw: Any, path: Path, where: str, extra: frozenset[str] = frozenset()) -> Prices | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(path, where, "must be an object of prices per million tokens, or null")
    unknown = sorted(set(raw) - set(PRICE_FIELDS) - extra)
    if unknown:
        raise _bad(path, f"{where}.{unknown[0]}", f"is not a price field ({', '.join(PRICE_FIELDS)})")
    return Prices(**{field: _number(raw.get(field), path, f"{where}.{field}") for field in PRICE_FIELDS})


def _model(name: str, raw: Mapping[str, Any], rule_sets: Mapping[str, RuleSet], path: Path) -> ModelEntry:
    where = f"models.{name}"
    provider, sep, model = name.partition(":")
    if not sep or not provider or not model:
        raise _bad(path, where, "must be named 'provider:model'")
    rules_name = raw.get("rules")
    if rules_name not in rule_sets:
        raise _bad(path, f"{where}.rules", f"names no rule set (known: {', '.join(sorted(rule_sets))})")
    rules = rule_sets[rules_name]
    encoding = raw.get("encoding", "o200k_base")
    if not isinstance(encoding, str) or not encoding:
        raise _bad(path, f"{where}.encoding", "must be an encoding name such as o200k_base")
    exact = raw.get("exact_tokens", provider == "openai")
    if not isinstance(exact, bool):
        raise _bad(path, f"{where}.exact_tokens", "must be true or false")
    long_raw = raw.get("long_context")
    long_context = None
    if long_raw is not None:
        if not isinstance(long_raw, dict) or "above_tokens" not in long_raw:
            raise _bad(path, f"{where}.long_context", "must be an object with above_tokens and prices")
        above = _count(long_raw["above_tokens"], path, f"{where}.long_context.above_tokens", 0)
        long_prices = _prices(long_raw, path, f"{where}.long_context", frozenset({"above_tokens"}))
        assert long_prices is not None  # a dict was checked above
        long_context = LongContext(above, long_prices)
    return ModelEntry(
        key=name,
        rules=rules,
        encoding=encoding,
        exact_tokens=exact,
        min_tokens=_count(raw.get("min_tokens"), path, f"{where}.min_tokens", rules.min_tokens),
        prices=_prices(raw.get("price"), path, f"{where}.price"),
        long_context=long_context,
        source=_text(raw.get("source"), path, f"{where}.source"),
        read=_text(raw.get("read"), path, f"{where}.read"),
        notes=_text(raw.get("notes"), path, f"{where}.notes"),
        unverified=_strings(raw.get("unverified"), path, f"{where}.unverified"),
    )


# --------------------------------------------------------------------------- prices


def rates_for(entry: ModelEntry, prompt_tokens: int) -> Prices | None:
    """The prices one request pays: the long-context row applies to the whole request above its threshold."""
    if entry.long_context is not None and prompt_tokens > entry.long_context.above_tokens:
        return entry.long_context.prices
    return entry.prices


def cost_of(
    entry: ModelEntry,
    *,
    prompt_tokens: int,
    cached_tokens: int,
    writes: Mapping[str, int],
    output_tokens: int,
) -> float | None:
    """USD for one request; ``writes`` maps a write TTL ("5m", "1h", "30m") to the tokens written at it."""
    written = sum(writes.values())
    if any(n < 0 for n in (prompt_tokens, cached_tokens, output_tokens, *writes.values())):
        raise ValueError("token counts must be >= 0")
    if cached_tokens + written > prompt_tokens:
        raise ValueError(
            f"cached ({cached_tokens}) + written ({written}) tokens exceed the prompt ({prompt_tokens})"
        )
    rates = rates_for(entry, prompt_tokens)
    if rates is None:
        return None
    parts: list[tuple[int, float | None]] = [
        (prompt_tokens - cached_tokens - written, rates.input),
        (cached_tokens, rates.cache_read),
        (output_tokens, rates.output),
    ]
    for ttl, tokens in writes.items():
        if ttl not in WRITE_TTLS:
            raise ValueError(f"write TTL must be one of {WRITE_TTLS}, got {ttl!r}")
        parts.append((tokens, rates.write_rate(ttl)))
    total = 0.0
    for tokens, rate in parts:
        if tokens == 0:
            continue
        if rate is None:
            return None  # a kind of token the table has no price for
        total += tokens * rate
    return total / TOKENS_PER_MILLION


def price(
    provider_model: str,
    table: PriceTable,
    *,
    prompt_tokens: int,
    cached_tokens: int,
    cache_write_tokens: int = 0,
    output_tokens: int = 0,
    write_ttl: str = "5m",
) -> float | None:
    """USD for one request with these token counts; ``None`` when the table lacks a needed price.

    ``prompt_tokens`` counts every input token, cached and written ones included (uncached =
    prompt - cached - written), as Anthropic's three usage fields add up and as OpenAI reports.
    """
    return cost_of(
        table.entry(provider_model),
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        writes={write_ttl: cache_write_tokens},
        output_tokens=output_tokens,
    )
