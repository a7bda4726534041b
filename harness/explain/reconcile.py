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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.explain.formats import LoggedUsage
from harness.prefix import cached_tokens_for

OTHER_BLOCK_SIZES = (16, 32, 64, 128, 256)  # block sizes vLLM deployments commonly run with


@dataclass(frozen=True)
class Reconciliation:
    reported_prompt_tokens: int | None
    reported_cached_tokens: int
    agrees: bool
    cause: str | None  # the first explanation that fits (see the module docstring); None when agreeing
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "reported_prompt_tokens": self.reported_prompt_tokens,
            "reported_cached_tokens": self.reported_cached_tokens,
            "agrees_with_reported": self.agrees,
            "disagreement_cause": self.cause,
            "disagreement_detail": self.detail,
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
