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
``providers``
    ``"provider"`` -> its ``default`` model (and ``why`` that one): what ``--provider openai``
    means when no model is named. The defaults of OpenAI, Anthropic and Gemini are also what
    ``--provider all`` prices.

A user file has the same shape. It is merged entry by entry: a model or rule set it names gets
the user's fields over the shipped ones (so ``{"models": {"vllm:*": {"price": {...}}}}`` only
adds a price), a name the table lacks is added and must then be complete. Anything malformed is
a one-line ``UserError`` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.errors import UserError

DEFAULT_TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "providers.json"
USER_SECTIONS = ("models", "rule_sets", "providers")
FAMILIES = (
    "openai_breakpoints",
    "openai_prefix",
    "anthropic",
    "gemini_implicit",
    "prefix_units",
    "engine",
    "none",
)
# Families whose caches are separated by prompt_cache_key unless the rule set says otherwise.
KEYED_BY_DEFAULT = ("openai_breakpoints", "openai_prefix")
FRAMINGS = ("openai_chat", "none")
BOUNDARIES = ("token", "message")  # automatic prefixes: a hit ends anywhere, or only at a message end
EXCESS_BREAKPOINTS = ("refuse", "keep_last")  # more breakpoints than allowed: a 400, or the last ones count
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
    interval: int  # automatic prefixes: hits in steps of this many; prefix_units: unit spacing (0: none)
    ttl_seconds: float | None  # None: nothing expires
    ttl_by_label: Mapping[str, float]  # anthropic: {"5m": 300, "1h": 3600}
    max_breakpoints: int
    lookback_blocks: int
    max_writes: int
    earlier_message_endings: int
    explicit_first: int
    explicit_latest: int
    block_size: int | None  # engines: tokens per cache block (None: from the engine)
    keyed: bool  # requests with different prompt_cache_key never share a cache
    boundary: str  # automatic prefixes: "token", or "message" (a hit ends at a message end)
    write_ttl: str | None  # automatic prefixes with paid writes: the write label ("5m"); None: free
    read_ratio: float | None  # cache reads cost this x the input price when the model lists no cache_read
    write_ratio: float | None  # cache writes likewise, when the model lists no cache_write
    excess_breakpoints: str  # anthropic family: "refuse" (a 400; the first ones simulated) or "keep_last"
    tool_breakpoints: bool  # anthropic family: a breakpoint may sit on a tool definition
    without_breakpoints: str | None  # the rule set a request without any breakpoint is served by
    source: str
    read: str
    notes: str
    unverified: tuple[str, ...]


@dataclass(frozen=True)
class ProviderInfo:
    """What ``--provider NAME`` means without a model: the table's default model for that provider."""

    name: str
    default: str | None  # "provider:model", or None (self-hosted engines, a user's own provider)
    why: str


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
    providers: Mapping[str, ProviderInfo]  # provider -> its default model

    def known(self) -> tuple[str, ...]:
        return tuple(sorted(self.models))

    def provider_names(self) -> tuple[str, ...]:
        return tuple(sorted({key.partition(":")[0] for key in self.models} | set(self.providers)))

    def models_of(self, provider: str) -> tuple[str, ...]:
        return tuple(key for key in self.known() if key.partition(":")[0] == provider)

    def entry(self, name: str) -> ModelEntry:
        """The entry for ``provider:model`` (falling back to ``provider:*``), or a provider's default model.

        ``openai`` alone is the table's default OpenAI model; the entry's ``key`` names it.
        """
        provider, sep, model = name.partition(":")
        if not sep:
            return self._default(name)
        if not provider or not model:
            raise UserError(f"expected 'provider' or 'provider:model', got '{name}'")
        found = self.models.get(name) or self.models.get(f"{provider}:*")
        if found is not None:
            return found
        if provider not in self.provider_names():
            raise self._unknown_provider(provider)
        models = ", ".join(self.models_of(provider))
        raise UserError(f"unknown provider/model '{name}'; {provider} models: {models}")

    def _default(self, provider: str) -> ModelEntry:
        info = self.providers.get(provider)
        if info is not None and info.default is not None:
            return self.models[info.default]
        wildcard = self.models.get(f"{provider}:*")
        if wildcard is not None:
            return wildcard
        if provider in self.provider_names():
            raise UserError(
                f"provider '{provider}' has no default model in the table; name one: "
                f"{', '.join(self.models_of(provider))}"
            )
        raise self._unknown_provider(provider)

    def _unknown_provider(self, provider: str) -> UserError:
        names = ", ".join(self.provider_names())
        return UserError(
            f"unknown provider '{provider}'; providers: {names} (or provider:model, see docs/providers.md)"
        )


# --------------------------------------------------------------------------- loading


def load_table(path: Path | None = None) -> PriceTable:
    """The shipped table, overridden and extended entry by entry by ``path`` (a ``--prices`` file)."""
    shipped = _read_json(DEFAULT_TABLE_PATH)
    files = [DEFAULT_TABLE_PATH]
    origin_models = dict.fromkeys(_section(shipped, "models", DEFAULT_TABLE_PATH), DEFAULT_TABLE_PATH)
    origin_rules = dict.fromkeys(_section(shipped, "rule_sets", DEFAULT_TABLE_PATH), DEFAULT_TABLE_PATH)
    origin_providers = dict.fromkeys(_section(shipped, "providers", DEFAULT_TABLE_PATH), DEFAULT_TABLE_PATH)
    models = dict(_section(shipped, "models", DEFAULT_TABLE_PATH))
    rule_sets = dict(_section(shipped, "rule_sets", DEFAULT_TABLE_PATH))
    providers = dict(_section(shipped, "providers", DEFAULT_TABLE_PATH))
    if path is not None:
        path = Path(path)
        user = _read_json(path)
        unknown = sorted(set(user) - {"schema", "about", *USER_SECTIONS})
        if unknown:
            raise UserError(
                f"{path}: unknown top-level key '{unknown[0]}' "
                "(expected 'models', 'rule_sets' and/or 'providers')"
            )
        if not set(user) & set(USER_SECTIONS):
            raise UserError(f"{path}: no 'models', 'rule_sets' or 'providers' to add")
        sections = (
            (models, origin_models, "models"),
            (rule_sets, origin_rules, "rule_sets"),
            (providers, origin_providers, "providers"),
        )
        for target, origin, section in sections:
            for name, fields in _section(user, section, path).items():
                if not isinstance(fields, dict):
                    raise UserError(f"{path}: {section}.{name} must be an object")
                # Entry by entry: the user's fields win, the shipped ones fill the rest.
                target[name] = {**target.get(name, {}), **fields}
                origin[name] = path
        files.append(path)
    built_rules = {name: _rule_set(name, raw, origin_rules[name]) for name, raw in rule_sets.items()}
    for name, built in built_rules.items():
        if built.without_breakpoints is not None and built.without_breakpoints not in built_rules:
            known = ", ".join(sorted(built_rules))
            where = f"rule_sets.{name}.without_breakpoints"
            raise _bad(origin_rules[name], where, f"names no rule set ({known})")
    built_models = {
        name: _model(name, raw, built_rules, origin_models[name]) for name, raw in models.items()
    }
    built_providers = {
        name: _provider(name, raw, built_models, origin_providers[name]) for name, raw in providers.items()
    }
    return PriceTable(built_models, built_rules, tuple(files), built_providers)


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


def _flag(value: Any, path: Path, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(path, where, f"must be true or false, got {json.dumps(value)}")
    return value


def _choice(value: Any, choices: tuple[str, ...], path: Path, where: str) -> str:
    if value not in choices:
        raise _bad(path, where, f"must be one of {', '.join(choices)}, got {json.dumps(value)}")
    return str(value)


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
    interval = _count(raw.get("interval"), path, f"{where}.interval", 0 if family == "prefix_units" else 1)
    if interval == 0 and family != "prefix_units":
        raise _bad(path, f"{where}.interval", "must be at least 1")
    boundary = _choice(raw.get("boundary", "token"), BOUNDARIES, path, f"{where}.boundary")
    excess = _choice(
        raw.get("excess_breakpoints", "refuse"), EXCESS_BREAKPOINTS, path, f"{where}.excess_breakpoints"
    )
    write_ttl = raw.get("write_ttl")
    if write_ttl is not None:
        write_ttl = _choice(write_ttl, WRITE_TTLS, path, f"{where}.write_ttl")
    block_size = raw.get("block_size")
    if block_size is not None:
        block_size = _count(block_size, path, f"{where}.block_size", 1)
    if family == "anthropic" and ("5m" not in ttl_by_label or not set(ttl_by_label) <= {"5m", "1h"}):
        raise _bad(path, f"{where}.ttl_seconds", 'must give seconds for "5m" (and "1h" where offered)')
    without = raw.get("without_breakpoints")
    if without is not None and not isinstance(without, str):
        raise _bad(path, f"{where}.without_breakpoints", f"must name a rule set, got {json.dumps(without)}")
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
        keyed=_flag(raw.get("keyed"), path, f"{where}.keyed", family in KEYED_BY_DEFAULT),
        boundary=boundary,
        write_ttl=write_ttl,
        read_ratio=_number(raw.get("read_ratio"), path, f"{where}.read_ratio"),
        write_ratio=_number(raw.get("write_ratio"), path, f"{where}.write_ratio"),
        excess_breakpoints=excess,
        tool_breakpoints=_flag(raw.get("tool_breakpoints"), path, f"{where}.tool_breakpoints", True),
        without_breakpoints=without,
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


def _provider(name: str, raw: Any, models: Mapping[str, ModelEntry], path: Path) -> ProviderInfo:
    where = f"providers.{name}"
    if not isinstance(raw, dict):
        raise _bad(path, where, "must be an object with a default model")
    if ":" in name or not name:
        raise _bad(path, where, "must be a provider name without ':'")
    default = raw.get("default")
    key = None
    if default is not None:
        if not isinstance(default, str) or not default:
            raise _bad(path, f"{where}.default", f"must be a model name, got {json.dumps(default)}")
        key = f"{name}:{default}"
        if key not in models:
            raise _bad(path, f"{where}.default", f"names no model '{key}' in the table")
    return ProviderInfo(name, key, _text(raw.get("why"), path, f"{where}.why"))


# --------------------------------------------------------------------------- prices


def rates_for(entry: ModelEntry, prompt_tokens: int) -> Prices | None:
    """The prices one request pays: the long-context row applies to the whole request above its threshold.

    A rule set's ``read_ratio``/``write_ratio`` price cache reads/writes as a multiple of the input
    price where the model lists none (Alibaba: explicit-cache reads at 10% of input, implicit-cache
    reads at 20%, for the same model).
    """
    rates = entry.prices
    if entry.long_context is not None and prompt_tokens > entry.long_context.above_tokens:
        rates = entry.long_context.prices
    if rates is None:
        return None
    rules = entry.rules

    def derived(listed: float | None, ratio: float | None) -> float | None:
        if listed is not None or ratio is None or rates is None or rates.input is None:
            return listed
        return ratio * rates.input

    return replace(
        rates,
        cache_read=derived(rates.cache_read, rules.read_ratio),
        cache_write=derived(rates.cache_write, rules.write_ratio),
    )


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
