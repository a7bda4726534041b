"""What the log costs under each provider's caching rules, and what its breaks cost (``--provider``).

The same requests are priced four ways:

* ``vllm``: this analysis itself (vLLM's block rule at the engine's block size, exact tokens);
* ``sglang``: a radix cache with page size 1, so every shared token is reused (the last prompt
  token is always computed), exact tokens;
* ``openai:MODEL``, ``anthropic:MODEL``, ``gemini:MODEL``: the hosted provider's documented rules
  (``harness.providers``: minimum lengths, increments, breakpoints, TTLs from the log's
  timestamps, write and read prices), on the provider's tokens (exact for OpenAI, approximate
  for Anthropic and Gemini).

Self-hosted engines have no list price: give one with ``--prices FILE`` (a ``vllm:*`` or
``sglang:*`` entry) to see dollars; without it their tokens are shown and their cost is ``null``.

For each request the cost had it extended its reference append-only is priced too; the
difference is what its break cost (``Loss``), and every such dollar has a cause, found on the
rendering that provider reads:

* a hosted provider (``provider_view``): the first piece of the body, in that provider's order
  and tokens, where the request stops extending its reference (a tool, the system prompt, a
  message), named by the same heuristics as the local analysis. The local chat template may not
  render that piece at all (many drop the tool list); the provider does, so its loss is its
  cause. With the simulation's own verdict (``is_append_only``) a loss always has a change;
* ``vllm`` and ``sglang``: the local analysis (their rendering *is* the local one), or the
  request's ``cache_salt`` when it differs from its reference's (vLLM keeps salted requests apart);
* ``unknown`` only when nothing in the two bodies differs: then the loss is the provider's side
  (an eviction, the TTL, routing to another machine), never a change the agent made.

So ``lost_to_breaks_usd`` is the sum over requests of ``cost_usd - cost_if_extended_usd`` (where
positive: a break that happened to match another request's cache costs nothing) and equals the
sum of ``lost_by_cause_usd``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.explain.analyze import RequestExplanation
from harness.explain.formats import ChatRequest
from harness.explain.provider_view import PieceChange, Reading, first_change, segments_of, ttl_of
from harness.providers import PriceTable, ProviderRequest, ProviderUsage, Segment, Simulation, price

__all__ = [
    "ENGINES",
    "LogCost",
    "Loss",
    "Priced",
    "Pricer",
    "expand",
    "price_log",
    "segments_of",
    "usd_by_line",
]

ENGINES = ("vllm", "sglang")
# What "--provider all" prices besides the engines: each provider's default model in the table.
DEFAULT_HOSTED = ("openai", "anthropic", "gemini")


UNKNOWN = "unknown"  # a loss with nothing changed in the bodies: the provider's side
LOCAL = "local"  # a cause found on the local rendering (the chat template of --model)


@dataclass(frozen=True)
class Loss:
    """What one request's break cost under one provider, and what caused it."""

    line: int
    usd: float  # cost_usd - cost_if_extended_usd (> 0)
    tokens: int  # cached tokens it would have read had it extended its reference
    cause: str  # the hint's kind, "changed_text", "cache_salt", or UNKNOWN
    found_by: str  # LOCAL, or the provider:model whose reading of the body holds the change
    same_as_local: bool  # the local analysis breaks at this line for the same cause
    change: PieceChange | None = None  # the provider's finding (None: local or unknown)

    def to_json(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "usd": round(self.usd, 6),
            "tokens": self.tokens,
            "cause": self.cause,
            "found_by": self.found_by,
            "same_as_local": self.same_as_local,
        }


@dataclass(frozen=True)
class Priced:
    """One request under one provider: its usage, what its break cost, and (a hosted provider)
    where it stops extending its reference in that provider's reading."""

    usage: ProviderUsage
    loss: Loss | None
    change: PieceChange | None
    hosted: bool

    def to_json(self, e: RequestExplanation) -> dict[str, Any]:
        usage, loss = self.usage, self.loss
        row: dict[str, Any] = {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "prompt_tokens": usage.prompt_tokens,
            "cost_usd": usage.cost_usd,
            "cost_if_extended_usd": usage.cost_if_extended_usd,
            "cached_if_extended_tokens": usage.cached_if_extended_tokens,
            "approximate": usage.approximate,
            "notes": list(usage.notes),
            "lost_usd": round(loss.usd, 6) if loss is not None else 0.0,
            "cause": loss.cause if loss is not None else None,
            "found_by": loss.found_by if loss is not None else None,
        }
        if self.hosted:
            row["status"] = "cold" if e.reference_line is None else ("break" if self.change else "extends")
            row["change"] = self.change.to_json() if self.change is not None else None
        return row


@dataclass(frozen=True)
class LogCost:
    """One provider's view of the whole log: running totals, and every loss with its cause."""

    provider_model: str
    spent_usd: float | None
    lost_to_breaks_usd: float | None
    lost_by_cause: dict[str, float] = field(default_factory=dict)
    approximate: bool = False
    assumption: str | None = None  # e.g. automatic caching assumed for a log without cache_control
    losses: tuple[Loss, ...] = ()
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    priced: tuple[Priced, ...] = ()  # per request, when kept (``price_log``; not for a log streamed)

    @property
    def usages(self) -> list[ProviderUsage]:
        return [p.usage for p in self.priced]

    @property
    def changes(self) -> tuple[PieceChange | None, ...]:
        """Per request (hosted providers): where it first stops extending its reference in this
        provider's reading, None when it extends it (or has no reference); empty for the engines."""
        return tuple(p.change for p in self.priced) if any(p.hosted for p in self.priced) else ()

    def to_json(self) -> dict[str, Any]:
        return {
            "spent_usd": _round(self.spent_usd),
            "lost_to_breaks_usd": _round(self.lost_to_breaks_usd),
            "lost_by_cause_usd": {k: _round(v) for k, v in self.lost_by_cause.items()},
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "prompt_tokens": self.prompt_tokens,
            "approximate": self.approximate,
            "assumption": self.assumption,
            "losses": [loss.to_json() for loss in self.losses],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def expand(names: Sequence[str]) -> list[str]:
    """``--provider`` values, ``all`` expanded, engines named plainly (``vllm``, ``sglang``)."""
    out: list[str] = []
    for name in names:
        for part in (p.strip() for p in name.split(",")):
            if not part:
                continue
            chosen = [*ENGINES, *DEFAULT_HOSTED] if part == "all" else [part]
            out += [c for c in chosen if c not in out]
    return out


def resolve(names: Sequence[str], table: PriceTable) -> list[str]:
    """``expand``ed, each hosted name checked and written as the table's ``provider:model`` (a
    provider alone is its default model), each once: ``all,openai:gpt-6.2-sol`` prices that model
    once. An unknown provider or model fails here, before anything slow."""
    out: list[str] = []
    for name in expand(names):
        key = name if name in ENGINES else table.entry(name).key
        if key not in out:
            out.append(key)
    return out


# --------------------------------------------------------------------------- one request, one provider


def _has_breakpoints(request: ChatRequest) -> bool:
    return "cache_control" in json.dumps(request.body)


def provider_request(request: ChatRequest, segments: tuple[Segment, ...], automatic: bool) -> ProviderRequest:
    """One request as ``harness.providers`` reads it. ``automatic``: Anthropic's top-level automatic
    caching for a request without any ``cache_control`` (what a client sending it to Anthropic
    would switch on); a request with its own breakpoints keeps them."""
    body = request.body
    control = body.get("cache_control")
    top = ttl_of({"cache_control": control}) if control is not None else ("5m" if automatic else None)
    options = body.get("prompt_cache_options")
    return ProviderRequest(
        line=request.line,
        session_id=request.session_id,
        timestamp=request.timestamp,
        segments=segments,
        model=body.get("model"),
        prompt_cache_key=body.get("prompt_cache_key"),
        top_level_cache_control=top,
        output_tokens=_output_tokens(request),
        reference=None,
        openai_cache_mode=options.get("mode") if isinstance(options, dict) else None,
    )


def _output_tokens(request: ChatRequest) -> int:
    usage = request.response.usage if request.response is not None else None
    return int(usage.output_tokens or 0) if usage is not None else 0


def _engine_cause(request: ChatRequest, e: RequestExplanation, reference: ChatRequest | None) -> str:
    """Why an engine (vLLM, SGLang: the local rendering) lost what it lost at this request."""
    if e.cause is not None:
        return e.cause
    if reference is not None and request.body.get("cache_salt") != reference.body.get("cache_salt"):
        return "cache_salt"
    return UNKNOWN


class Pricer:
    """One provider's prices for a log, request by request in log order (``add``), with running
    totals (``total``): what a long log needs is the provider's cache, not its requests."""

    def __init__(self, name: str, table: PriceTable, model: str, keep: bool = False) -> None:
        self.table = table
        self.engine = name if name in ENGINES else None
        self.keep = keep  # keep every request's result (``LogCost.priced``)
        if self.engine is not None:
            self.provider_model = f"{name}:{model}"
        else:
            self.simulation = Simulation(name, table)
            self.reading = Reading(self.simulation.entry)
            self.provider_model = self.simulation.entry.key
        self._priced: list[Priced] = []
        self._losses: list[Loss] = []
        self._spent: float | None = 0.0
        self._all_priced = True
        self._approximate = False
        self._tokens = [0, 0, 0]  # prompt, cached, written
        self._requests = 0
        self._without_breakpoints = 0

    def _usage(self, request: ChatRequest, e: RequestExplanation) -> ProviderUsage:
        assert self.engine is not None
        key, out_tokens = f"{self.engine}:*", _output_tokens(request)
        last = max(0, e.prompt_tokens - 1)  # the last prompt token is always computed
        if self.engine == "vllm":
            cached, kept = e.predicted_cached_tokens, e.predicted_cached_tokens + e.lost_tokens
        else:  # page size 1: every shared token counts
            cached = min(e.cache_common_prefix, last)
            kept = max(cached, min(e.reference_tokens, last)) if e.reference_line is not None else cached
        cost, if_extended = (
            price(key, self.table, prompt_tokens=e.prompt_tokens, cached_tokens=n, output_tokens=out_tokens)
            for n in (cached, kept)
        )
        return ProviderUsage(
            self.provider_model, e.prompt_tokens, cached, 0, out_tokens, cost, if_extended, False, (), kept
        )

    def add(self, request: ChatRequest, e: RequestExplanation, reference: ChatRequest | None) -> Priced:
        """``reference``: the earlier request ``e`` compares with (its ``reference_line``)."""
        change: PieceChange | None = None
        if self.engine is not None:
            usage = self._usage(request, e)
        else:
            entry = self.simulation.entry
            pieces, prompt = self.reading.read(request)
            automatic = entry.key.startswith("anthropic:") and not _has_breakpoints(request)
            self._without_breakpoints += automatic
            segments = tuple(segment for segment, _ in pieces)
            before = self.reading.read(reference)[1] if reference is not None else None
            usage = self.simulation.add(provider_request(request, segments, automatic), prompt, before)
            if reference is not None:
                change = first_change(reference, request, reading=self.reading, span=False)
                if change is not None and change.cause != e.cause:
                    # Only this provider's reading shows it: a volatile span of its own, with its extent.
                    change = first_change(reference, request, reading=self.reading)
        loss = None
        if usage.cost_usd is None or usage.cost_if_extended_usd is None:
            self._all_priced = False
        elif usage.cost_usd - usage.cost_if_extended_usd > 0:
            extra = usage.cost_usd - usage.cost_if_extended_usd
            tokens = max(0, (usage.cached_if_extended_tokens or usage.cached_tokens) - usage.cached_tokens)
            if self.engine is None:
                cause = change.cause if change is not None else UNKNOWN
                found_by = usage.provider_model if change is not None else UNKNOWN
                loss = Loss(e.line, extra, tokens, cause, found_by, cause == e.cause, change)
            else:
                cause = _engine_cause(request, e, reference)
                loss = Loss(e.line, extra, tokens, cause, LOCAL, cause == e.cause)
            self._losses.append(loss)
        self._requests += 1
        self._spent = None if self._spent is None or usage.cost_usd is None else self._spent + usage.cost_usd
        self._approximate = self._approximate or usage.approximate
        for i, value in enumerate((usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens)):
            self._tokens[i] += value
        priced = Priced(usage, loss, change, self.engine is None)
        if self.keep:
            self._priced.append(priced)
        return priced

    def total(self) -> LogCost:
        assumption = None
        if self._without_breakpoints:
            assumption = (
                f"{self._without_breakpoints} of {self._requests} requests have no cache_control: "
                "Anthropic's automatic caching (a top-level cache_control) assumed for them"
            )
        lost_by: dict[str, float] = {}
        for loss in self._losses:
            lost_by[loss.cause] = lost_by.get(loss.cause, 0.0) + loss.usd
        return LogCost(
            self.provider_model,
            self._spent,
            sum(loss.usd for loss in self._losses) if self._all_priced else None,
            lost_by,
            self._approximate,
            assumption,
            tuple(self._losses),
            *self._tokens,
            tuple(self._priced),
        )


def price_log(
    names: Sequence[str],
    requests: Sequence[ChatRequest],
    explanations: Sequence[RequestExplanation],
    table: PriceTable,
    model: str,
) -> list[LogCost]:
    """Every ``names`` provider's usage and cost for the log, each lost dollar with its cause
    (see the module docstring); every request's result kept (``LogCost.priced``)."""
    by_line = {r.line: r for r in requests}
    pricers = [Pricer(name, table, model, keep=True) for name in names]
    for request, e in zip(requests, explanations, strict=True):
        reference = by_line.get(e.reference_line) if e.reference_line is not None else None
        for pricer in pricers:
            pricer.add(request, e, reference)
    return [pricer.total() for pricer in pricers]


def usd_by_line(costs: Sequence[LogCost]) -> dict[int, dict[str, float]]:
    """Per line, per provider: the dollars of the breaks the local analysis names the same way
    (its volatile spans carry them); the others are the provider spans' (``spans.provider_spans``)."""
    out: dict[int, dict[str, float]] = {}
    for c in costs:
        for loss in c.losses:
            if loss.same_as_local:
                out.setdefault(loss.line, {})[c.provider_model] = loss.usd
    return out
