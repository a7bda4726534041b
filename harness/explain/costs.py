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
from harness.providers import PriceTable, ProviderRequest, ProviderUsage, price, simulate

__all__ = ["ENGINES", "LogCost", "Loss", "expand", "price_log", "segments_of", "usd_by_line"]

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
class LogCost:
    """One provider's view of the whole log."""

    provider_model: str
    usages: list[ProviderUsage]
    spent_usd: float | None
    lost_to_breaks_usd: float | None
    lost_by_cause: dict[str, float] = field(default_factory=dict)
    approximate: bool = False
    assumption: str | None = None  # e.g. automatic caching assumed for a log without cache_control
    losses: tuple[Loss, ...] = ()
    # Per request (hosted providers): where it first stops extending its reference in this
    # provider's reading, None when it extends it (or has no reference); empty for the engines.
    changes: tuple[PieceChange | None, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "spent_usd": _round(self.spent_usd),
            "lost_to_breaks_usd": _round(self.lost_to_breaks_usd),
            "lost_by_cause_usd": {k: _round(v) for k, v in self.lost_by_cause.items()},
            "cached_tokens": sum(u.cached_tokens for u in self.usages),
            "cache_write_tokens": sum(u.cache_write_tokens for u in self.usages),
            "prompt_tokens": sum(u.prompt_tokens for u in self.usages),
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


# --------------------------------------------------------------------------- the log as pieces


def _has_breakpoints(request: ChatRequest) -> bool:
    return "cache_control" in json.dumps(request.body)


def provider_requests(
    requests: Sequence[ChatRequest], explanations: Sequence[RequestExplanation], auto_cache: bool
) -> list[ProviderRequest]:
    """The log for ``harness.providers.simulate``: pieces, timestamps, references by position.

    ``auto_cache``: a request without any ``cache_control`` gets Anthropic's top-level automatic
    caching (what a client sending it to Anthropic would switch on); others keep their own."""
    position = {e.line: i for i, e in enumerate(explanations)}
    out: list[ProviderRequest] = []
    for request, explained in zip(requests, explanations, strict=True):
        body = request.body
        control = body.get("cache_control")
        automatic = auto_cache and not _has_breakpoints(request)
        top = ttl_of({"cache_control": control}) if control is not None else ("5m" if automatic else None)
        usage = request.response.usage if request.response is not None else None
        options = body.get("prompt_cache_options")
        out.append(
            ProviderRequest(
                line=request.line,
                session_id=request.session_id,
                timestamp=request.timestamp,
                segments=segments_of(request),
                model=body.get("model"),
                prompt_cache_key=body.get("prompt_cache_key"),
                top_level_cache_control=top,
                output_tokens=int(usage.output_tokens or 0) if usage is not None else 0,
                reference=position.get(explained.reference_line)
                if explained.reference_line is not None
                else None,
                openai_cache_mode=options.get("mode") if isinstance(options, dict) else None,
            )
        )
    return out


# --------------------------------------------------------------------------- the engines


def _engine_usages(
    engine: str, model: str, explanations: Sequence[RequestExplanation], table: PriceTable, output: list[int]
) -> list[ProviderUsage]:
    key = f"{engine}:*"
    usages: list[ProviderUsage] = []
    for e, out_tokens in zip(explanations, output, strict=True):
        last = max(0, e.prompt_tokens - 1)  # the last prompt token is always computed
        if engine == "vllm":
            cached, kept = e.predicted_cached_tokens, e.predicted_cached_tokens + e.lost_tokens
        else:  # page size 1: every shared token counts
            cached = min(e.cache_common_prefix, last)
            kept = max(cached, min(e.reference_tokens, last)) if e.reference_line is not None else cached
        cost = price(
            key, table, prompt_tokens=e.prompt_tokens, cached_tokens=cached, output_tokens=out_tokens
        )
        if_extended = price(
            key, table, prompt_tokens=e.prompt_tokens, cached_tokens=kept, output_tokens=out_tokens
        )
        usages.append(
            ProviderUsage(
                f"{engine}:{model}",
                e.prompt_tokens,
                cached,
                0,
                out_tokens,
                cost,
                if_extended,
                False,
                (),
                kept,
            )
        )
    return usages


# --------------------------------------------------------------------------- totals


def _sum(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(sum(v for v in values if v is not None))


def _engine_cause(request: ChatRequest, e: RequestExplanation, reference: ChatRequest | None) -> str:
    """Why an engine (vLLM, SGLang: the local rendering) lost what it lost at this request."""
    if e.cause is not None:
        return e.cause
    if reference is not None and request.body.get("cache_salt") != reference.body.get("cache_salt"):
        return "cache_salt"
    return UNKNOWN


def price_log(
    names: Sequence[str],
    requests: Sequence[ChatRequest],
    explanations: Sequence[RequestExplanation],
    table: PriceTable,
    model: str,
) -> list[LogCost]:
    """Every ``names`` provider's usage and cost for the log, each lost dollar with its cause
    (see the module docstring)."""
    output = [
        int(r.response.usage.output_tokens or 0)
        if r.response is not None and r.response.usage is not None
        else 0
        for r in requests
    ]
    by_line = {r.line: r for r in requests}
    references = [
        by_line.get(e.reference_line) if e.reference_line is not None else None for e in explanations
    ]
    without = sum(not _has_breakpoints(r) for r in requests)
    costs: list[LogCost] = []
    for name in names:
        assumption = None
        changes: tuple[PieceChange | None, ...] = ()
        if name in ENGINES:
            usages = _engine_usages(name, model, explanations, table, output)
        else:
            entry = table.entry(name)
            auto = entry.key.startswith("anthropic:") and without > 0
            if auto:
                assumption = (
                    f"{without} of {len(requests)} requests have no cache_control: Anthropic's automatic "
                    "caching (a top-level cache_control) assumed for them"
                )
            usages = simulate(entry.key, provider_requests(requests, explanations, auto), table)
            reading = Reading(entry)
            found: list[PieceChange | None] = []
            for request, reference, e in zip(requests, references, explanations, strict=True):
                change = (
                    first_change(reference, request, reading=reading, span=False)
                    if reference is not None
                    else None
                )
                if change is not None and change.cause != e.cause:
                    # Only this provider's reading shows it: a volatile span of its own, with its extent.
                    change = first_change(reference, request, reading=reading)
                found.append(change)
            changes = tuple(found)
        losses: list[Loss] = []
        priced = True
        for i, (request, e, u) in enumerate(zip(requests, explanations, usages, strict=True)):
            if u.cost_usd is None or u.cost_if_extended_usd is None:
                priced = False
                continue
            extra = u.cost_usd - u.cost_if_extended_usd
            if extra <= 0:
                continue
            tokens = max(0, (u.cached_if_extended_tokens or u.cached_tokens) - u.cached_tokens)
            if changes:
                change = changes[i]
                cause = change.cause if change is not None else UNKNOWN
                found_by = u.provider_model if change is not None else UNKNOWN
                losses.append(Loss(e.line, extra, tokens, cause, found_by, cause == e.cause, change))
            else:
                cause = _engine_cause(request, e, references[i])
                losses.append(Loss(e.line, extra, tokens, cause, LOCAL, cause == e.cause))
        lost_by: dict[str, float] = {}
        for loss in losses:
            lost_by[loss.cause] = lost_by.get(loss.cause, 0.0) + loss.usd
        costs.append(
            LogCost(
                usages[0].provider_model if usages else name,
                usages,
                _sum([u.cost_usd for u in usages]),
                sum(loss.usd for loss in losses) if priced else None,
                lost_by,
                any(u.approximate for u in usages),
                assumption,
                tuple(losses),
                changes,
            )
        )
    return costs


def usd_by_line(costs: Sequence[LogCost]) -> dict[int, dict[str, float]]:
    """Per line, per provider: the dollars of the breaks the local analysis names the same way
    (its volatile spans carry them); the others are the provider spans' (``spans.provider_spans``)."""
    out: dict[int, dict[str, float]] = {}
    for c in costs:
        for loss in c.losses:
            if loss.same_as_local:
                out.setdefault(loss.line, {})[c.provider_model] = loss.usd
    return out
