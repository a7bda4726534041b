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
difference on a break is what that break cost, summed per cause (the break's hint).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.explain.analyze import RequestExplanation
from harness.explain.formats import ANTHROPIC, ChatRequest
from harness.providers import PriceTable, ProviderRequest, ProviderUsage, Segment, price, simulate

ENGINES = ("vllm", "sglang")
# One current model per hosted provider: what "--provider all" prices.
DEFAULT_HOSTED = ("openai:gpt-6.2-sol", "anthropic:claude-sonnet-5-5", "gemini:gemini-3.8-flash")


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


def _ttl(block: Any) -> str | None:
    control = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(control, dict):
        return None
    return "1h" if control.get("ttl") == "1h" else "5m"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text(v.get("text", v) if isinstance(v, dict) else v) for v in value)
    return json.dumps(value, ensure_ascii=False)


def segments_of(request: ChatRequest) -> tuple[Segment, ...]:
    """The prompt as a hosted provider reads it: tools, system, then messages, block by block."""
    body = request.body
    pieces: list[Segment] = [
        Segment("tool", json.dumps(tool, ensure_ascii=False), None, _ttl(tool))
        for tool in body.get("tools") or []
    ]
    if request.format == ANTHROPIC:
        system = body.get("system")
        blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
        pieces += [Segment("system", _text(b.get("text", "")), "system", _ttl(b)) for b in blocks]
    for number, message in enumerate(request.messages):
        role = str(message.get("role"))
        kind = "system" if role in ("system", "developer") else "message"
        content = message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        for block in blocks:
            if block.get("type") == "text":
                text = str(block.get("text", ""))
            elif block.get("type") == "tool_result":
                text = _text(block.get("content", ""))
            else:  # tool_use, images and the like: their JSON stands for their tokens
                text = json.dumps(
                    {k: v for k, v in block.items() if k != "cache_control"}, ensure_ascii=False
                )
            pieces.append(Segment(kind, text, role, _ttl(block), number))
        if message.get("tool_calls"):
            pieces.append(
                Segment(kind, json.dumps(message["tool_calls"], ensure_ascii=False), role, None, number)
            )
    return tuple(pieces)


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
        top = _ttl({"cache_control": control}) if control is not None else ("5m" if automatic else None)
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
                f"{engine}:{model}", e.prompt_tokens, cached, 0, out_tokens, cost, if_extended, False, ()
            )
        )
    return usages


# --------------------------------------------------------------------------- totals


def _sum(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(sum(v for v in values if v is not None))


def price_log(
    names: Sequence[str],
    requests: Sequence[ChatRequest],
    explanations: Sequence[RequestExplanation],
    table: PriceTable,
    model: str,
) -> list[LogCost]:
    """Every ``names`` provider's usage and cost for the log (see the module docstring)."""
    output = [
        int(r.response.usage.output_tokens or 0)
        if r.response is not None and r.response.usage is not None
        else 0
        for r in requests
    ]
    without = sum(not _has_breakpoints(r) for r in requests)
    costs: list[LogCost] = []
    for name in names:
        assumption = None
        if name in ENGINES:
            usages = _engine_usages(name, model, explanations, table, output)
            key = name
        else:
            key = table.entry(name).key
            auto = key.startswith("anthropic:") and without > 0
            if auto:
                assumption = (
                    f"{without} of {len(requests)} requests have no cache_control: Anthropic's automatic "
                    "caching (a top-level cache_control) assumed for them"
                )
            usages = simulate(key, provider_requests(requests, explanations, auto), table)
        spent = _sum([u.cost_usd for u in usages])
        lost_by: dict[str, float] = {}
        lost: float | None = 0.0
        for e, u in zip(explanations, usages, strict=True):
            if u.cost_usd is None or u.cost_if_extended_usd is None:
                lost = None
                continue
            extra = u.cost_usd - u.cost_if_extended_usd
            if e.is_break and extra > 0:
                cause = e.hint.kind if e.hint is not None else "unexplained"
                lost_by[cause] = lost_by.get(cause, 0.0) + extra
                if lost is not None:
                    lost += extra
        costs.append(
            LogCost(
                usages[0].provider_model if usages else key,
                usages,
                spent,
                lost,
                lost_by,
                any(u.approximate for u in usages),
                assumption,
            )
        )
    return costs


def usd_by_line(
    costs: Sequence[LogCost], explanations: Sequence[RequestExplanation]
) -> dict[int, dict[str, float]]:
    """Per break line, per provider: the dollars the break cost (spent minus append-only)."""
    out: dict[int, dict[str, float]] = {}
    for c in costs:
        for e, u in zip(explanations, c.usages, strict=True):
            if e.is_break and u.cost_usd is not None and u.cost_if_extended_usd is not None:
                out.setdefault(e.line, {})[c.provider_model] = max(0.0, u.cost_usd - u.cost_if_extended_usd)
    return out
