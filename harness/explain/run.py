"""One pass over a log: every request explained, priced, diagnosed, replayed and written as it comes.

``LogRun.add`` takes the requests in log order and returns each one's ``RequestResult`` at once;
nothing about a request is kept once its row is written, except what the console shows of the
first ``max_held`` requests (``Held``) and running totals (``Totals``): memory is bounded by the
caches and the open sessions (``analyze.LogExplainer``), never by the length of the log. The
volatile spans and the providers' losses are gathered as the breaks come (there are far fewer
breaks than requests).

``JsonOutput`` writes the ``--json`` document (one JSON object, the requests streamed into its
``requests`` array) or the ``--jsonl`` rows (a header line, one line per request as it is
explained, a summary line at the end: for logs too big to read back as one document).
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.explain.analyze import LogExplainer, RequestExplanation
from harness.explain.costs import LogCost, Priced, Pricer
from harness.explain.diagnostics import Diagnoser, Diagnosis
from harness.explain.formats import ChatRequest, SkippedLine
from harness.explain.origin import Answered, Origin
from harness.explain.profile import DISABLED, Profile
from harness.explain.spans import SpanCollector, VolatileSpan, provider_spans
from harness.explain.verify import VerifiedRequest, Verifier

DEFAULT_MAX_HELD = 1000  # requests whose rows and details the console shows


@dataclass(frozen=True)
class RequestResult:
    """Everything the run says about one request."""

    request: ChatRequest
    explanation: RequestExplanation
    priced: dict[str, Priced]  # provider:model -> its usage, cost and loss (``--provider``)
    origin: Origin | None  # who answered it (None: no response logged)
    diagnosis: Diagnosis | None  # the provider's own reason for a miss, compared
    verified: VerifiedRequest | None  # the engine's count (``--verify`` / ``--endpoint``)

    def row(self) -> dict[str, Any]:
        """The request's row in ``--json`` / ``--jsonl``."""
        e = self.explanation
        row = e.to_json()
        if self.priced:
            row["providers"] = {name: priced.to_json(e) for name, priced in self.priced.items()}
        row["format"] = self.request.format
        if self.diagnosis is not None:
            row["provider_diagnosis"] = self.diagnosis.to_json()
        if self.origin is not None:
            o = self.origin
            row["answered_by"] = {
                "provider_model": o.provider_model,
                "provider": o.provider,
                "model": o.model,
                "host": o.host,
                "evidence": o.evidence,
            }
        if self.verified is not None:
            row["engine_cached_tokens"] = self.verified.engine_cached_tokens
            row["engine_prompt_tokens"] = self.verified.prompt_tokens
            row["engine_matches"] = self.verified.matches
        return row


@dataclass
class Totals:
    """The summary of every request so far: what ``--json``'s ``summary`` says, kept as sums."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    breaks: int = 0
    lost_tokens: int = 0
    lost_by_hint: dict[str, int] = field(default_factory=dict)  # what the breaks cost, by cause
    reply_tokens: int = 0
    reported: int = 0
    reported_agree: int = 0
    reported_cached_tokens: int = 0
    reported_causes: Counter[str] = field(default_factory=Counter)
    reconciled_with: Counter[str] = field(default_factory=Counter)
    diagnoses: int = 0
    diagnoses_compared: int = 0
    diagnoses_agree: int = 0
    diagnoses_disagree: list[int] = field(default_factory=list)
    diagnoses_by_reason: Counter[str] = field(default_factory=Counter)
    longer_than_context: list[int] = field(default_factory=list)
    verified: int = 0
    engine_disagrees: list[int] = field(default_factory=list)

    def add(
        self,
        e: RequestExplanation,
        diagnosis: Diagnosis | None = None,
        verified: VerifiedRequest | None = None,
    ) -> None:
        self.requests += 1
        self.prompt_tokens += e.prompt_tokens
        self.cached_tokens += e.predicted_cached_tokens
        self.breaks += e.is_break
        self.lost_tokens += e.lost_tokens
        if e.cause is not None:
            self.lost_by_hint[e.cause] = self.lost_by_hint.get(e.cause, 0) + e.lost_tokens
        self.reply_tokens += e.reply_tokens
        r = e.reconciliation
        if r is not None:
            self.reported += 1
            self.reported_agree += r.agrees
            self.reported_cached_tokens += r.reported_cached_tokens
            if r.cause is not None:
                self.reported_causes[r.cause] += 1
            self.reconciled_with[r.reconciled_with] += 1
        d = diagnosis
        if d is not None:
            self.diagnoses += 1
            self.diagnoses_by_reason[d.reason or d.outcome] += 1
            if d.agrees is not None:
                self.diagnoses_compared += 1
                self.diagnoses_agree += bool(d.agrees)
                if not d.agrees:
                    self.diagnoses_disagree.append(d.line)
        if e.longer_than_context:
            self.longer_than_context.append(e.line)
        v = verified
        if v is not None:
            self.verified += 1
            if v.engine_cached_tokens != e.predicted_cached_tokens or v.prompt_tokens != e.prompt_tokens:
                self.engine_disagrees.append(e.line)

    def reported_json(self) -> dict[str, Any]:
        return {
            "requests": self.reported,
            "agree": self.reported_agree,
            "reported_cached_tokens": self.reported_cached_tokens,
            "causes": dict(self.reported_causes),
            "reconciled_with": dict(self.reconciled_with),
        }

    def diagnostics_json(self) -> dict[str, Any]:
        return {
            "requests": self.diagnoses,
            "compared": self.diagnoses_compared,
            "agree": self.diagnoses_agree,
            "disagree_lines": list(self.diagnoses_disagree),
            "by_reason": dict(self.diagnoses_by_reason),
        }

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.cached_tokens,
            "hit_rate": round(self.cached_tokens / self.prompt_tokens, 4) if self.prompt_tokens else 0.0,
            "breaks": self.breaks,
            "lost_tokens": self.lost_tokens,
            "lost_by_hint": dict(self.lost_by_hint),
            "reply_tokens": self.reply_tokens,
        }
        if self.reported:
            out["reported"] = self.reported_json()
        if self.diagnoses:
            out["provider_diagnostics"] = self.diagnostics_json()
        return out


@dataclass
class Held:
    """What the console shows of a long log: the first ``limit`` requests (their rows, break
    details, diagnoses, origins) and the breaks a suggestion needs; counts for the rest."""

    limit: int = DEFAULT_MAX_HELD
    results: list[RequestResult] = field(default_factory=list)
    beyond: int = 0  # requests not held
    breaks: list[RequestExplanation] = field(default_factory=list)  # every break, up to 10x limit

    def add(self, result: RequestResult) -> None:
        if len(self.results) < self.limit:
            self.results.append(result)
        else:
            self.beyond += 1
        if result.explanation.is_break and len(self.breaks) < 10 * self.limit:
            self.breaks.append(result.explanation)

    @property
    def explanations(self) -> list[RequestExplanation]:
        return [r.explanation for r in self.results]

    @property
    def verified(self) -> list[VerifiedRequest] | None:
        checks = [r.verified for r in self.results]
        return None if not checks or any(v is None for v in checks) else checks  # type: ignore[return-value]

    @property
    def diagnoses(self) -> list[Diagnosis]:
        return [r.diagnosis for r in self.results if r.diagnosis is not None]

    @property
    def origins(self) -> list[tuple[int, Origin]]:
        return [(r.request.line, r.origin) for r in self.results if r.origin is not None]


@dataclass(frozen=True)
class Finished:
    """The end of a run: the summary, the providers' totals, the spans."""

    totals: Totals
    costs: list[LogCost]
    spans: list[VolatileSpan]
    local_spans: list[VolatileSpan]


class LogRun:
    """The analysis of one log as it streams by (see the module docstring)."""

    def __init__(
        self,
        explainer: LogExplainer,
        pricers: Sequence[Pricer] = (),
        answered: Answered | None = None,
        verifier: Verifier | None = None,
        max_held: int = DEFAULT_MAX_HELD,
        profile: Profile = DISABLED,
    ) -> None:
        self.explainer = explainer
        self.pricers = list(pricers)
        self.answered = answered
        self.diagnoser = Diagnoser(
            answered.table if answered is not None else None, explainer.by_response_id, explainer.request_at
        )
        self.verifier = verifier
        self.totals = Totals()
        self.held = Held(max_held)
        self.spans = SpanCollector()
        self.profile = profile

    def add(self, request: ChatRequest) -> RequestResult:
        e = self.explainer.explain(request)
        reference = (
            self.explainer.request_at(request.session_id, e.reference_line)
            if e.reference_line is not None
            else None
        )
        with self.profile.stage("providers"):
            origin = None
            if self.answered is not None:
                e, origin = self.answered.add(request, e)
            priced = {p.provider_model: p.add(request, e, reference) for p in self.pricers}
            key = origin.provider_model if origin is not None else None
            diagnosis = self.diagnoser.add(request, e, key)
        verified = None
        if self.verifier is not None:
            with self.profile.stage("replay"):
                verified = self.verifier.add(request, e)
        with self.profile.stage("hints and spans"):
            local = {
                name: p.loss.usd for name, p in priced.items() if p.loss is not None and p.loss.same_as_local
            }
            self.spans.add(e, local)
        result = RequestResult(request, e, priced, origin, diagnosis, verified)
        self.totals.add(e, diagnosis, verified)
        self.held.add(result)
        return result

    def finish(self) -> Finished:
        costs = [p.total() for p in self.pricers]
        local = self.spans.spans()
        spans = sorted([*local, *provider_spans(costs)], key=lambda s: (-s.tokens_lost, s.line))
        return Finished(self.totals, costs, spans, local)


# --------------------------------------------------------------------------- --json and --jsonl


TOOL_NAME = "harness.explain"
SCHEMA_VERSION = 2


def header(
    source: Path,
    model: str,
    chat_template: str | None,
    block_size: int,
    scope: str,
    verified: bool,
) -> dict[str, Any]:
    """What a result says about its run before its requests."""
    return {
        "tool": TOOL_NAME,
        "schema_version": SCHEMA_VERSION,
        "source": str(source),
        "model": model,
        "chat_template": chat_template,
        "block_size": block_size,
        "scope": scope,
        "verified": verified,
    }


def ending(
    skipped: Sequence[SkippedLine], finished: Finished, suggestion: dict[str, Any] | None
) -> dict[str, Any]:
    """What a result says about its run after its requests."""
    return {
        "skipped": [{"line": s.line, "error": s.error} for s in skipped],
        "summary": finished.totals.to_json(),
        "cost": {c.provider_model: c.to_json() for c in finished.costs},
        "volatile_spans": [span.to_json() for span in finished.spans],
        "suggestion": suggestion,
    }


def _dumps(value: Any, indent: int | None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


class JsonOutput:
    """``--json F`` (``lines=False``): the document, byte for byte what ``json.dumps(document,
    indent=2)`` writes, its requests streamed in; ``--jsonl F``: one record per line (``record``:
    ``header``, ``request``, ``summary``). Written to ``F.tmp`` and renamed at the end: a file is
    there whole or not at all."""

    def __init__(self, path: Path, lines: bool, head: dict[str, Any]) -> None:
        self.path = path
        self.lines = lines
        self.tmp = path.with_name(path.name + ".tmp")
        try:
            self.handle: io.TextIOWrapper = self.tmp.open("w", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.count = 0
        if lines:
            self._write(_dumps({"record": "header", **head}, None) + "\n")
        else:
            text = _dumps(head, 2)
            self._write(text[:-2] + ',\n  "requests": [')  # the header's closing "\n}" reopened

    def _write(self, text: str) -> None:
        try:
            self.handle.write(text)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def row(self, row: dict[str, Any]) -> None:
        if self.lines:
            self._write(_dumps({"record": "request", **row}, None) + "\n")
        else:
            text = _dumps(row, 2).replace("\n", "\n    ")
            self._write(("," if self.count else "") + "\n    " + text)
        self.count += 1

    def close(self, end: dict[str, Any]) -> None:
        if self.lines:
            self._write(_dumps({"record": "summary", **end}, None) + "\n")
        else:
            rest = _dumps(end, 2)
            self._write(("\n  ]" if self.count else "]") + ",\n" + rest[2:] + "\n")
        try:
            self.handle.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def abandon(self) -> None:
        """Leave nothing behind (the run stopped): the target as it was, no temporary file."""
        self.handle.close()
        self.tmp.unlink(missing_ok=True)
