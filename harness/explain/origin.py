"""Which server answered a logged request: a vLLM server (the local rendering applies) or a hosted API.

A log recorded from Anthropic's API carries Anthropic's usage (``cache_read_input_tokens``, in
Claude's tokens); held to the local vLLM rendering of another model, every request would only be
"rendered differently". So a response's own account of itself (``diagnostics.ProviderDiagnostics``:
its ``model`` and the record's URL) decides, in this order:

1. a URL on this machine or a private network (``localhost``, ``127.0.0.1``, ``10.x``, ...) is a
   self-hosted server: vLLM, whatever model name it serves (vLLM answers ``/v1/messages`` with
   Anthropic-shaped usage too);
2. a provider's API host (``api.anthropic.com``, ``api.openai.com``,
   ``generativelanguage.googleapis.com``), else the model name's family (``claude-*``,
   ``gpt-*``/``o1``/``o3``/``o4-*``/``chatgpt-*``, ``gemini-*``; a gateway's ``anthropic/claude-*``
   too), names the provider; any other model name is a vLLM server's;
3. the model is the rules table's entry of that provider whose name the model starts with
   (``claude-sonnet-5-5-20261001`` is ``anthropic:claude-sonnet-5-5``); a model the table lacks is
   said so and left to the local rendering (``--prices`` adds it).

``reconcile_answered`` then simulates each provider over the requests it answered
(``harness.providers.simulate``: its rules, its token counts, the log's timestamps, the bodies as
sent: no automatic caching assumed) and reconciles their usage with it
(``reconcile.reconcile_with_provider``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlparse

from harness.explain.analyze import RequestExplanation
from harness.explain.costs import provider_request, segments_of
from harness.explain.formats import ChatRequest
from harness.explain.reconcile import reconcile_with_provider
from harness.providers import PriceTable, Simulation

API_HOSTS = {
    "api.anthropic.com": "anthropic",
    "api.openai.com": "openai",
    "generativelanguage.googleapis.com": "gemini",
}
MODEL_FAMILIES = (
    ("claude-", "anthropic"),
    ("gpt-", "openai"),
    ("chatgpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4-", "openai"),
    ("gemini-", "gemini"),
)
GATEWAY_PREFIXES = {"anthropic": "anthropic", "openai": "openai", "gemini": "gemini", "google": "gemini"}
LOCAL_NAMES = ("localhost", "host.docker.internal")


@dataclass(frozen=True)
class Origin:
    """Who answered one request, and why the explainer thinks so."""

    provider_model: str | None  # the rules-table entry its usage is held to; None: the local rendering
    provider: str | None  # "anthropic", ... even when the model is not in the table; None: vLLM
    model: str | None  # as the response (else the body) names it
    host: str | None
    evidence: str  # "claude-sonnet-5-5-20261001 at api.anthropic.com"


def _is_local(host: str) -> bool:
    if host in LOCAL_NAMES or host.endswith((".local", ".internal", ".localhost")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_private or address.is_loopback or address.is_unspecified or address.is_link_local


def _family(model: str) -> tuple[str | None, str]:
    """(provider, the model's own name) from a model name, a gateway's ``provider/model`` included."""
    prefix, slash, rest = model.partition("/")
    if slash:
        return GATEWAY_PREFIXES.get(prefix.lower()), rest
    return next((p for start, p in MODEL_FAMILIES if model.startswith(start)), None), model


def _entry_key(provider: str, model: str, table: PriceTable) -> str | None:
    """The table's ``provider:model`` for ``model``: exact, else the longest name it starts with
    followed by a dash (a dated snapshot: ``gpt-4.1-2025-04-14`` is ``gpt-4.1``)."""
    exact = f"{provider}:{model}"
    if exact in table.models:
        return exact
    names = [key.split(":", 1)[1] for key in table.models if key.startswith(f"{provider}:")]
    matches = [name for name in names if name != "*" and model.startswith(name + "-")]
    return f"{provider}:{max(matches, key=len)}" if matches else None


def answered_by(request: ChatRequest, table: PriceTable) -> Origin:
    """Who answered ``request`` (see the module docstring)."""
    said = request.response.diagnostics if request.response is not None else None
    model = (said.model if said is not None else None) or request.body.get("model")
    model = model if isinstance(model, str) else None
    url = said.url if said is not None else None
    host = urlparse(url).hostname if url and "://" in url else None
    where = f" at {host}" if host else ""
    if host is not None and _is_local(host):
        return Origin(
            None, None, model, host, f"{model or 'a model'}{where}: a server on this network (vLLM)"
        )
    provider, name = _family(model) if model else (None, "")
    provider = API_HOSTS.get(host or "", provider)
    if provider is None or not name:
        return Origin(
            None, None, model, host, f"{model or 'no model'}{where}: not a hosted provider's (vLLM)"
        )
    key = _entry_key(provider, name, table)
    if key is None:
        evidence = f"{model}{where}: a {provider} model the rules table lacks (--prices adds it)"
        return Origin(None, provider, model, host, evidence)
    return Origin(key, provider, model, host, f"{model}{where}")


class Answered:
    """Who answered each request, and its reported usage held to that provider's simulation,
    request by request in log order (one ``Simulation`` per provider that answered)."""

    def __init__(self, table: PriceTable) -> None:
        self.table = table
        self._simulations: dict[str, Simulation] = {}

    def add(self, request: ChatRequest, e: RequestExplanation) -> tuple[RequestExplanation, Origin | None]:
        """``e`` reconciled with the provider that answered (unchanged for vLLM), and the origin
        (None: no response logged)."""
        if request.response is None:
            return e, None
        origin = answered_by(request, self.table)
        key = origin.provider_model
        if key is None:
            return e, origin
        simulation = self._simulations.get(key)
        if simulation is None:
            simulation = self._simulations[key] = Simulation(key, self.table)
        # The body as it was sent: a request without cache_control cached nothing there.
        usage = simulation.add(provider_request(request, segments_of(request), automatic=False))
        logged = e.usage
        if logged is not None and logged.cached_tokens is not None:
            e = replace(e, reconciliation=reconcile_with_provider(logged, usage))
        return e, origin


def reconcile_answered(
    requests: Sequence[ChatRequest], explanations: Sequence[RequestExplanation], table: PriceTable
) -> tuple[list[RequestExplanation], list[Origin | None]]:
    """The explanations with the usage of every request a hosted provider answered reconciled
    with that provider's simulation; and each request's ``Origin`` (None: no response logged)."""
    answered = Answered(table)
    pairs = [answered.add(r, e) for r, e in zip(requests, explanations, strict=True)]
    return [e for e, _ in pairs], [o for _, o in pairs]
