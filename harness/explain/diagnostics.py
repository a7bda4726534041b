"""The providers' own reason for a cache miss, read from the log and set next to the explainer's finding.

Two hosted APIs now say why a request did not reuse the prefix of an earlier one, when asked:

Anthropic (Messages API; beta header ``cache-diagnosis-2026-04-07``)
    Request: ``"diagnostics": {"previous_message_id": "msg_..."}`` (``null`` on the first turn, to
    opt in). Response: ``"diagnostics": {"cache_miss_reason": {"type": T,
    "cache_missed_input_tokens": N}}`` with ``T`` one of ``model_changed``, ``system_changed``,
    ``tools_changed``, ``messages_changed`` (these four carry ``N``, an estimate of the tokens that
    would have been read), ``previous_message_not_found``, ``unavailable``. ``diagnostics`` is
    ``null`` when the request did not ask or when nothing diverged; ``cache_miss_reason: null``
    inside it means the comparison was still running.
OpenAI (Responses API, GPT-5.6 and later)
    Request: ``"prompt_cache_options": {"comparison_response_id": "resp_..."}``. Response:
    ``"prompt_cache_diagnostics"``, one of ``{"type": "cache_hit"}``, ``{"type": "cache_miss",
    "reason": R, "cache_missed_tokens": N, "comparison_reusable_tokens": M}`` (``M`` optional),
    ``{"type": "comparison_response_not_found"}``, ``{"type": "unavailable"}``; ``R`` one of
    ``model_changed``, ``prompt_cache_key_changed``, ``tools_changed``, ``text_format_changed``,
    ``reasoning_effort_changed``, ``verbosity_changed``, ``context_compacted``, ``input_changed``,
    ``service_tier_changed``.

(Sources and read dates: docs/providers.md, "Providers' own diagnostics"; the shapes are the
official SDKs' types, ``anthropic`` 2.15 ``types.Diagnostics`` and ``openai`` 3.57
``types.responses.response.PromptCacheDiagnostics``.)

``read_diagnostics`` reads the response's side of that, for any response format, together with
what a response says about who answered it (its ``id``, ``model``, the record's URL):
``formats.parse_record`` fills ``LoggedResponse.diagnostics`` with it. ``compare_diagnostics``
then resolves the baseline the provider compared with (the earlier record whose response ``id``
the request names), finds the explainer's own answer for the same pair of requests (the part
that changed first: ``model``, a setting, or the first differing piece as the provider reads the
body, ``provider_view.first_change``), and says whether the two agree on the part: ``model``,
``system``, ``tools``, ``messages`` (OpenAI's ``input`` covers both system and messages).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # formats imports this module; these only type the comparison below
    from harness.explain.analyze import RequestExplanation
    from harness.explain.formats import ChatRequest
    from harness.explain.provider_view import PieceChange
    from harness.providers import PriceTable

ANTHROPIC = "anthropic"
OPENAI = "openai"
# The provider's reason -> the part of the request it names.
ANTHROPIC_PARTS = {
    "model_changed": "model",
    "system_changed": "system",
    "tools_changed": "tools",
    "messages_changed": "messages",
}
OPENAI_PARTS = {
    "model_changed": "model",
    "tools_changed": "tools",
    "input_changed": "input",  # instructions and input items: the system prompt and the messages
    "context_compacted": "input",
    "prompt_cache_key_changed": "prompt_cache_key",
    "service_tier_changed": "service_tier",
    "reasoning_effort_changed": "reasoning_effort",
    "text_format_changed": "text_format",
    "verbosity_changed": "verbosity",
}
OPENAI_OUTCOMES = {
    "cache_hit": "hit",
    "cache_miss": "miss",
    "comparison_response_not_found": "baseline_not_found",
    "unavailable": "unavailable",
}
NOTHING = "none"  # the part when nothing changed


@dataclass(frozen=True)
class ProviderDiagnostics:
    """What a logged response says about itself: who answered, and the provider's own miss diagnosis.

    ``outcome`` is None when the response carries no diagnosis; else ``miss``, ``hit`` (OpenAI's
    ``cache_hit``), ``pending`` (Anthropic's comparison still running), ``baseline_not_found``
    (Anthropic's ``previous_message_not_found``, OpenAI's ``comparison_response_not_found``) or
    ``unavailable``.
    """

    response_id: str | None  # what a later request names as its baseline
    model: str | None  # the model as the response names it
    url: str | None  # where the request went, when the record says
    provider: str | None = None  # whose diagnosis it is: ANTHROPIC | OPENAI (None: no diagnosis)
    outcome: str | None = None
    reason: str | None = None  # the provider's own word: "tools_changed", "input_changed", ...
    missed_tokens: int | None = None  # its estimate of the tokens the miss cost
    reusable_tokens: int | None = None  # OpenAI: the reusable prefix of the compared response

    @property
    def part(self) -> str | None:
        """The part of the request the provider says changed (NOTHING: a hit; None: no verdict)."""
        if self.outcome == "hit":
            return NOTHING
        if self.outcome != "miss" or self.reason is None:
            return None
        parts = ANTHROPIC_PARTS if self.provider == ANTHROPIC else OPENAI_PARTS
        return parts.get(self.reason)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_diagnostics(response: Any, url: str | None = None) -> ProviderDiagnostics | None:
    """The diagnosis a raw response dict carries, in any of the supported response formats."""
    if not isinstance(response, dict):
        return None
    model = response.get("model")
    found = ProviderDiagnostics(
        response.get("id") if isinstance(response.get("id"), str) else None,
        model if isinstance(model, str) else None,
        url,
    )
    openai = response.get("prompt_cache_diagnostics")
    if isinstance(openai, dict):
        outcome = OPENAI_OUTCOMES.get(str(openai.get("type")))
        return ProviderDiagnostics(
            found.response_id,
            found.model,
            url,
            OPENAI,
            outcome,
            openai.get("reason") if outcome == "miss" else None,
            _int(openai.get("cache_missed_tokens")),
            _int(openai.get("comparison_reusable_tokens")),
        )
    anthropic = response.get("diagnostics")
    if isinstance(anthropic, dict):
        reason = anthropic.get("cache_miss_reason")
        if not isinstance(reason, dict):
            return ProviderDiagnostics(found.response_id, found.model, url, ANTHROPIC, "pending")
        kind = str(reason.get("type"))
        outcome = {"previous_message_not_found": "baseline_not_found", "unavailable": "unavailable"}
        return ProviderDiagnostics(
            found.response_id,
            found.model,
            url,
            ANTHROPIC,
            outcome.get(kind, "miss"),
            kind,
            _int(reason.get("cache_missed_input_tokens")),
        )
    return found


# --------------------------------------------------------------------------- the request's side


def baseline_id(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(provider, the response id the request asked to be compared with), from the request body."""
    anthropic = body.get("diagnostics")
    if isinstance(anthropic, dict):
        previous = anthropic.get("previous_message_id")
        return ANTHROPIC, previous if isinstance(previous, str) else None
    options = body.get("prompt_cache_options")
    if isinstance(options, dict) and isinstance(options.get("comparison_response_id"), str):
        return OPENAI, options["comparison_response_id"]
    return None, None


def _reasoning_effort(body: dict[str, Any]) -> Any:
    reasoning = body.get("reasoning")
    return reasoning.get("effort") if isinstance(reasoning, dict) else body.get("reasoning_effort")


def _text_option(name: str) -> Callable[[dict[str, Any]], Any]:
    def read(body: dict[str, Any]) -> Any:
        text = body.get("text")
        value = text.get(name) if isinstance(text, dict) else None
        if value is None:
            value = body.get("response_format" if name == "format" else name)
        return value

    return read


# Request settings that decide reuse beside the prompt's tokens, as OpenAI's reasons name them.
SETTINGS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("prompt_cache_key", lambda body: body.get("prompt_cache_key")),
    ("service_tier", lambda body: body.get("service_tier") or "auto"),
    ("reasoning_effort", _reasoning_effort),
    ("text_format", _text_option("format")),
    ("verbosity", _text_option("verbosity")),
)


def explainer_part(baseline: ChatRequest, request: ChatRequest, change: PieceChange | None) -> str:
    """The part that changed first between two requests, by the explainer's own reading."""
    if baseline.body.get("model") != request.body.get("model"):
        return "model"
    for name, read in SETTINGS:
        if read(baseline.body) != read(request.body):
            return name
    return change.part if change is not None else NOTHING


def comparable(part: str | None, provider: str) -> str | None:
    """A part in the provider's vocabulary (OpenAI's ``input`` is the system prompt and the messages)."""
    if provider == OPENAI and part in ("system", "messages"):
        return "input"
    return part


@dataclass(frozen=True)
class Diagnosis:
    """One request's diagnosis by its provider, next to the explainer's finding for the same pair."""

    line: int
    provider: str
    outcome: str  # see ProviderDiagnostics.outcome; "none_reported": Anthropic's null (no divergence)
    reason: str | None
    missed_tokens: int | None
    baseline_id: str | None  # the response id the request named
    baseline_line: int | None  # the record holding that response; None: not in the log
    compared_with: int | None  # the line the explainer compared with (the baseline, else the reference)
    provider_part: str | None
    explainer_part: str | None
    change: PieceChange | None  # the explainer's finding (None: nothing changed in the pieces)

    @property
    def agrees(self) -> bool | None:
        """Do both name the same part? None when either has no verdict to compare."""
        if self.provider_part is None or self.explainer_part is None:
            return None
        return comparable(self.explainer_part, self.provider) == self.provider_part

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "outcome": self.outcome,
            "reason": self.reason,
            "missed_tokens": self.missed_tokens,
            "baseline_id": self.baseline_id,
            "baseline_line": self.baseline_line,
            "compared_with_line": self.compared_with,
            "provider_part": self.provider_part,
            "explainer_part": self.explainer_part,
            "explainer_finding": self.change.to_json() if self.change is not None else None,
            "agrees": self.agrees,
        }


def diagnosed(request: ChatRequest) -> tuple[str, str, str | None] | None:
    """(provider, outcome, the part it names) when the request carries a provider's diagnosis,
    or asked Anthropic for one (a null answer then means nothing diverged); else None."""
    logged = request.response.diagnostics if request.response is not None else None
    asked, wanted = baseline_id(request.body)
    if logged is not None and logged.outcome is not None:
        return str(logged.provider), logged.outcome, logged.part
    if asked == ANTHROPIC and wanted is not None and request.response is not None:
        # Anthropic documents a null diagnostics, for a request that asked, as "nothing diverged".
        return ANTHROPIC, "none_reported", NOTHING
    return None


class Diagnoser:
    """Each request that carries a provider's diagnosis (or asked Anthropic for one), compared
    with the explainer's own finding for the same pair of requests, as the log goes (``add``).

    ``baseline(response_id)``: the earlier request whose response has that id; ``earlier(line)``:
    an earlier request of the same session (the analysis' reference). Either returns None when
    the request is not at hand (not in the log, or its session closed).
    """

    def __init__(
        self,
        table: PriceTable | None,
        baseline: Callable[[str], ChatRequest | None],
        earlier: Callable[[str | None, int], ChatRequest | None],
    ) -> None:
        self.table = table
        self.baseline = baseline
        self.earlier = earlier

    def add(
        self, request: ChatRequest, explained: RequestExplanation, key: str | None = None
    ) -> Diagnosis | None:
        """``key``: the table entry of the provider that answered (``origin``), so the explainer's
        finding has that provider's token offsets; without one it is piece by piece."""
        from harness.explain.provider_view import first_change

        logged = request.response.diagnostics if request.response is not None else None
        _, wanted = baseline_id(request.body)
        said = diagnosed(request)
        if said is None:
            return None
        provider, outcome, theirs = said
        named = self.baseline(wanted) if wanted is not None else None
        baseline = named
        if baseline is None and explained.reference_line is not None:
            # The named one is not in the log: the request the analysis compares it with.
            baseline = self.earlier(request.session_id, explained.reference_line)
        change, ours = None, None
        if baseline is not None:
            entry = self.table.entry(key) if key and self.table else None
            change = first_change(baseline, request, entry)
            ours = explainer_part(baseline, request, change)
        return Diagnosis(
            line=request.line,
            provider=provider,
            outcome=outcome,
            reason=logged.reason if logged is not None else None,
            missed_tokens=logged.missed_tokens if logged is not None else None,
            baseline_id=wanted,
            baseline_line=named.line if named is not None else None,
            compared_with=baseline.line if baseline is not None else None,
            provider_part=theirs,
            explainer_part=ours,
            change=change,
        )


def compare_diagnostics(
    requests: Sequence[ChatRequest],
    explanations: Sequence[RequestExplanation],
    table: PriceTable | None = None,
    entry_of: Callable[[ChatRequest], str | None] | None = None,
) -> list[Diagnosis]:
    """``Diagnoser`` over a whole log held in memory. ``entry_of(request)``: the table entry of the
    provider that answered it (``origin``)."""
    by_id: dict[str, ChatRequest] = {}
    by_line = {r.line: r for r in requests}
    diagnoser = Diagnoser(table, by_id.get, lambda _session, line: by_line.get(line))
    out: list[Diagnosis] = []
    for request, explained in zip(requests, explanations, strict=True):
        found = diagnoser.add(request, explained, entry_of(request) if entry_of is not None else None)
        if found is not None:
            out.append(found)
        logged = request.response.diagnostics if request.response is not None else None
        if logged is not None and logged.response_id is not None:
            by_id[logged.response_id] = request
    return out


def summary(diagnoses: Sequence[Diagnosis]) -> dict[str, Any]:
    """How often the providers' diagnoses and the explainer agree on the part that changed."""
    compared = [d for d in diagnoses if d.agrees is not None]
    return {
        "requests": len(diagnoses),
        "compared": len(compared),
        "agree": sum(bool(d.agrees) for d in compared),
        "disagree_lines": [d.line for d in compared if not d.agrees],
        "by_reason": dict(Counter(d.reason or d.outcome for d in diagnoses)),
    }
