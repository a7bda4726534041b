"""Replay a request log under one provider's caching rules: per request, what is read, written and paid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from harness.errors import UserError
from harness.providers import cache
from harness.providers.requests import ProviderRequest, ProviderUsage
from harness.providers.table import ModelEntry, PriceTable, cost_of
from harness.providers.tokens import Prompt, extended, is_append_only, layout

Store = cache.DigestStore | cache.SequenceStore | cache.UnitStore


def _outcome(entry: ModelEntry, prompt: Prompt, request: ProviderRequest, store: Store) -> cache.Outcome:
    family, now = entry.rules.family, request.timestamp
    if family == "anthropic":
        assert isinstance(store, cache.DigestStore)
        return cache.anthropic(entry, prompt, request.top_level_cache_control, store, now)
    if family == "openai_breakpoints":
        assert isinstance(store, cache.DigestStore)
        return cache.openai_breakpoints(entry, prompt, request.openai_cache_mode, store, now)
    if family in ("openai_prefix", "gemini_implicit"):
        assert isinstance(store, cache.SequenceStore)
        return cache.automatic_prefix(entry, prompt, store, now)
    if family == "prefix_units":
        assert isinstance(store, cache.UnitStore)
        return cache.prefix_units(entry, prompt, request.output_tokens, store, now)
    return cache.no_caching(entry)


def _new_store(entry: ModelEntry) -> Store:
    if entry.rules.family == "prefix_units":
        return cache.UnitStore()
    if entry.rules.family in ("anthropic", "openai_breakpoints"):
        return cache.DigestStore()
    return cache.SequenceStore()


def _serving(entry: ModelEntry, request: ProviderRequest, table: PriceTable) -> ModelEntry:
    """The rules that serve this request: a request with no breakpoint may fall to another rule set.

    Alibaba's explicit and implicit caches are exclusive per request: a request carrying a
    ``cache_control`` marker uses the explicit one, any other the implicit one (with its own
    minimum and read price, and its own cache).
    """
    fallback = entry.rules.without_breakpoints
    marked = request.top_level_cache_control is not None or any(
        segment.cache_control is not None for segment in request.segments
    )
    if fallback is None or marked:
        return entry
    rules = table.rule_sets[fallback]
    return replace(entry, rules=rules, min_tokens=rules.min_tokens)


def _cost(entry: ModelEntry, prompt: Prompt, outcome: cache.Outcome, output_tokens: int) -> float | None:
    return cost_of(
        entry,
        prompt_tokens=prompt.length,
        cached_tokens=outcome.cached,
        writes=outcome.writes,
        output_tokens=output_tokens,
    )


class Simulation:
    """One provider's cache, replayed request by request in log order (``add``).

    The cache state carries over from request to request as the provider keeps it: one cache per
    ``prompt_cache_key`` where the rule set is ``keyed`` (OpenAI, Azure, Mistral), else one shared
    cache (an Anthropic workspace, a Gemini project, a DeepSeek account); sessions do not separate
    caches on these APIs. Timestamps, when present, expire entries; a hit refreshes the entry it
    reads. What it holds is the provider's cache (digests of written prefixes, chunks of prompts
    seen), never the log.
    """

    def __init__(self, provider_model: str, table: PriceTable) -> None:
        self.entry = table.entry(provider_model)
        if self.entry.rules.family == "engine":
            raise UserError(
                f"'{provider_model}' is a self-hosted engine: the explainer simulates it exactly with the "
                "model's own tokenizer; simulate() covers the hosted providers"
            )
        self.table = table
        self._stores: dict[tuple[str | None, str], Store] = {}

    def layout(self, request: ProviderRequest) -> Prompt:
        return layout(self.entry, request.segments)

    def add(
        self, request: ProviderRequest, prompt: Prompt | None = None, reference: Prompt | None = None
    ) -> ProviderUsage:
        """The request's usage and cost; ``prompt``: its layout, when the caller has it already.

        ``reference``: the layout of the earlier request this one meant to extend. Its
        ``cost_if_extended_usd`` replays the request as if it had kept the reference's tokens
        unchanged (append-only), against the same cache state; for a request that already extends
        its reference, or has none, it equals ``cost_usd``.
        """
        entry = self.entry
        prompt = prompt if prompt is not None else self.layout(request)
        serving = _serving(entry, request, self.table)
        scope = request.prompt_cache_key if serving.rules.keyed else None
        store = self._stores.setdefault((scope, serving.rules.name), _new_store(serving))
        outcome = _outcome(serving, prompt, request, store)
        cost = _cost(serving, prompt, outcome, request.output_tokens)
        cost_if_extended = cost
        cached_if_extended = outcome.cached
        if reference is not None and not is_append_only(reference, prompt):
            # Asked before commit(): the counterfactual meets the state the real request met.
            alternative = extended(reference, prompt)
            alternative = _within_breakpoint_limit(serving, alternative)
            counterfactual = _outcome(serving, alternative, request, store)
            cost_if_extended = _cost(serving, alternative, counterfactual, request.output_tokens)
            cached_if_extended = counterfactual.cached
        outcome.commit()
        return ProviderUsage(
            provider_model=entry.key,
            prompt_tokens=prompt.length,
            cached_tokens=outcome.cached,
            cache_write_tokens=outcome.written,
            output_tokens=request.output_tokens,
            cost_usd=cost,
            cost_if_extended_usd=cost_if_extended,
            approximate=not entry.exact_tokens,
            notes=outcome.notes,
            cached_if_extended_tokens=cached_if_extended,
        )


def simulate(
    provider_model: str, requests: Sequence[ProviderRequest], table: PriceTable
) -> list[ProviderUsage]:
    """Each request's usage and cost under ``provider_model``'s rules, replayed in log order
    (``Simulation``); ``ProviderRequest.reference`` names an earlier request by position."""
    simulation = Simulation(provider_model, table)
    prompts: list[Prompt] = []
    usages: list[ProviderUsage] = []
    for index, request in enumerate(requests):
        prompts.append(simulation.layout(request))
        reference = None
        if request.reference is not None:
            if not 0 <= request.reference < index:
                raise ValueError(f"request {index}: reference {request.reference} is not an earlier request")
            reference = prompts[request.reference]
        usages.append(simulation.add(request, prompts[-1], reference))
    return usages


def _within_breakpoint_limit(entry: ModelEntry, prompt: Prompt) -> Prompt:
    """Keep an append-only counterfactual legal under Anthropic's 4-breakpoint limit.

    Its first part carries the reference's breakpoints and its tail this request's; together they
    can exceed the limit where neither did. An agent extending append-only moves its rolling
    breakpoint forward, so the first breakpoint (usually tools/system) and the latest ones stay.
    """
    if entry.rules.family != "anthropic" or entry.rules.excess_breakpoints == "keep_last":
        return prompt  # keep_last: the rule itself keeps the latest breakpoints
    limit = entry.rules.max_breakpoints
    marked = [index for index, block in enumerate(prompt.blocks) if block.cache_control is not None]
    if len(marked) <= limit:
        return prompt
    keep = set(marked[:1] + marked[len(marked) - (limit - 1) :]) if limit > 0 else set()
    blocks = tuple(
        block if index in keep or block.cache_control is None else replace(block, cache_control=None)
        for index, block in enumerate(prompt.blocks)
    )
    return Prompt(prompt.tokens, blocks)
