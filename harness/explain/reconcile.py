"""Putting the cached tokens a server reported next to the prediction, and naming why they differ.

A log that carries responses carries the server's own count: OpenAI-style
``usage.prompt_tokens_details.cached_tokens`` (vLLM with ``--enable-prompt-tokens-details``,
OpenAI), or Anthropic-style ``usage.cache_read_input_tokens`` (vLLM's ``/v1/messages`` reports its
prefix-cache hits there, in whole blocks). When the two agree, the log is explained token for
token. When they do not, the first of these that fits is named:

``rendered differently``
    the server counted another number of prompt tokens: another model, chat template or vLLM
    version rendered the body (``--model``, ``--chat-template``), or a gateway rewrote it;
``cache scope``
    the other ``--scope`` predicts exactly what was reported (sessions do or do not share blocks
    on that server: a ``cache_salt`` per session, or a router);
``block size B``
    the same shared prefix cut at another block size gives the reported count (vLLM's CUDA
    default is 16, this project's CPU engine uses 32; read it from the server's ``/metrics``);
``nothing served``
    0 reported where blocks were predicted: another worker behind a load balancer without session
    affinity, an eviction, a server restart, or a ``cache_salt`` not in the log;
``fewer served``
    some but fewer: blocks evicted (the cache is smaller than the traffic needs) or a worker that
    saw only part of this history;
``more served``
    more than this log explains: traffic that is not in the log (other clients, other sessions)
    computed the same blocks, or the provider caches by its own rules (``--provider``).

A log recorded from a hosted API (``origin.answered_by``: a ``claude-*`` model at
``api.anthropic.com``, ...) is reconciled with *that provider's* simulation instead
(``reconcile_with_provider``: its rules, its token counts), never with the local vLLM rendering,
which would only say that another model rendered it. The provider's token counts are
approximate (no offline tokenizer for Anthropic or Gemini; OpenAI's framing and hidden system
tokens), so the simulated counts are scaled to the reported prompt length and agree when within
``PROVIDER_TOLERANCE`` of it; a disagreement is ``nothing served``, ``fewer served``, ``more
served`` (the same causes, on the provider's side: an eviction, the TTL, routing, traffic not in
the log) or ``written differently`` (cache writes: a breakpoint or TTL the log does not show).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.explain.formats import LoggedUsage
from harness.prefix import cached_tokens_for
from harness.providers import ProviderUsage

OTHER_BLOCK_SIZES = (16, 32, 64, 128, 256)  # block sizes vLLM deployments commonly run with
LOCAL = "vllm"  # reconciled with this analysis: the local rendering on vLLM's block rule
# Counts within this share of the prompt agree with a provider's simulation: its token counts
# are approximate (another tokenizer, OpenAI's unpublished framing and hidden system tokens).
PROVIDER_TOLERANCE = 0.05


@dataclass(frozen=True)
class Reconciliation:
    reported_prompt_tokens: int | None
    reported_cached_tokens: int
    agrees: bool
    cause: str | None  # the first explanation that fits (see the module docstring); None when agreeing
    detail: str | None
    reconciled_with: str = LOCAL  # LOCAL, or the provider:model whose simulation the usage is held to
    approximate: bool = False  # the simulation's token counts are approximate
    provider_prompt_tokens: int | None = None  # the simulation's counts (reconciled_with a provider)
    provider_cached_tokens: int | None = None
    provider_cache_write_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "reported_prompt_tokens": self.reported_prompt_tokens,
            "reported_cached_tokens": self.reported_cached_tokens,
            "agrees_with_reported": self.agrees,
            "disagreement_cause": self.cause,
            "disagreement_detail": self.detail,
            "reconciled_with": self.reconciled_with,
            "reconciled_approximate": self.approximate,
            "provider_prompt_tokens": self.provider_prompt_tokens,
            "provider_cached_tokens": self.provider_cached_tokens,
            "provider_cache_write_tokens": self.provider_cache_write_tokens,
        }


def reconcile(
    usage: LoggedUsage,
    *,
    prompt_tokens: int,
    predicted: int,
    common_prefix: int,
    block_size: int,
    other_scope: tuple[str, int] | None = None,
) -> Reconciliation:
    """Compare ``usage`` (which must carry a cached count) with the prediction for one request."""
    reported = int(usage.cached_tokens or 0)

    def result(cause: str | None, detail: str | None) -> Reconciliation:
        return Reconciliation(usage.prompt_tokens, reported, cause is None, cause, detail)

    if usage.prompt_tokens is not None and usage.prompt_tokens != prompt_tokens:
        return result(
            "rendered differently",
            f"the server counted {usage.prompt_tokens} prompt tokens, this rendering {prompt_tokens}: "
            "another model, chat template or vLLM version (--model, --chat-template), or a rewritten body",
        )
    if reported == predicted:
        return result(None, None)
    if other_scope is not None and other_scope[1] == reported:
        return result(
            "cache scope",
            f"--scope {other_scope[0]} predicts the reported {reported}: "
            + (
                "sessions share blocks on that server"
                if other_scope[0] == "shared"
                else "each session had a cache of its own there (cache_salt per session, or a router)"
            ),
        )
    for other in OTHER_BLOCK_SIZES:
        if other != block_size and cached_tokens_for(prompt_tokens, common_prefix, other) == reported:
            return result(f"block size {other}", f"block size {other} gives the reported {reported}")
    if reported == 0:
        return result(
            "nothing served",
            f"0 served where {predicted} were predicted: another worker (no session affinity), an "
            "eviction, a restart, or a cache_salt not in the log",
        )
    if reported < predicted:
        return result(
            "fewer served",
            f"{reported} served, {predicted} predicted: blocks evicted, or a worker that saw only "
            "part of this history",
        )
    return result(
        "more served",
        f"{reported} served, {predicted} predicted: traffic not in this log computed the same "
        "blocks, or the provider caches by its own rules",
    )


def reconcile_with_provider(usage: LoggedUsage, simulated: ProviderUsage) -> Reconciliation:
    """Compare ``usage`` (with a cached count) with the simulation of the provider that answered it."""
    reported = int(usage.cached_tokens or 0)
    prompt = usage.prompt_tokens or simulated.prompt_tokens
    # The simulation counts in its own tokens: scale them to the provider's reported length.
    scale = prompt / simulated.prompt_tokens if simulated.prompt_tokens else 1.0
    read = round(simulated.cached_tokens * scale)
    written = round(simulated.cache_write_tokens * scale)
    slack = round(PROVIDER_TOLERANCE * prompt)
    tilde = "~" if simulated.approximate else ""
    name = simulated.provider_model

    def close(a: int, b: int) -> bool:
        return (a == 0) == (b == 0) and abs(a - b) <= slack

    def result(cause: str | None, detail: str | None) -> Reconciliation:
        return Reconciliation(
            usage.prompt_tokens,
            reported,
            cause is None,
            cause,
            detail,
            name,
            simulated.approximate,
            simulated.prompt_tokens,
            simulated.cached_tokens,
            simulated.cache_write_tokens,
        )

    predicted = f"{name}'s rules predict {tilde}{read}"
    if not close(reported, read):
        if reported == 0:
            return result(
                "nothing served",
                f"0 served where {predicted}: the provider's side (an eviction before the TTL, routing to "
                "another machine), or a breakpoint or prompt_cache_key the log does not show",
            )
        if reported < read:
            return result(
                "fewer served",
                f"{reported} served, {predicted}: part of the prefix evicted, or a breakpoint the log "
                "does not show",
            )
        return result(
            "more served",
            f"{reported} served, {predicted}: traffic not in this log (the same workspace or "
            "organization) wrote this prefix, or a rule the table does not capture",
        )
    if usage.cache_write_tokens is not None and not close(usage.cache_write_tokens, written):
        return result(
            "written differently",
            f"{usage.cache_write_tokens} written, {name}'s rules predict {tilde}{written}: a breakpoint "
            "or TTL the log does not show",
        )
    return result(None, None)
