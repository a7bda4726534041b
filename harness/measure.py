"""Run a lesson's request sequence through a backend and keep the engine's own numbers.

For every request the harness first *predicts* how many tokens the engine will serve from its
prefix cache (``prefix.PrefixCacheModel``), then sends it, then records the engine's count next
to the prediction. A variant starts from an empty cache, so WRONG and RIGHT are measured on
equal terms.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.backend import Backend, Message, PrefixCounters, Reply, RequestOptions
from harness.console import console
from harness.prefix import CacheModel, Divergence, Prediction, explain_divergence


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    cached_tokens: int  # engine truth
    predicted_cached_tokens: int  # harness prediction, made before the engine answered
    ttft_ms: float  # engine truth
    first_divergence: int  # first token index not shared with anything cached (== prompt_tokens: none)
    divergence: Divergence | None = None  # the text around first_divergence
    extra: dict[str, Any] = field(default_factory=dict)  # lesson-specific fields (e.g. worker)
    # The engine's whole answer (generated text, decoding time): for lessons that judge what was
    # generated; not in the JSON, where a lesson adds what it concludes from it to ``extra``.
    reply: Reply | None = field(default=None, repr=False, compare=False)

    @property
    def prediction_ok(self) -> bool:
        return self.cached_tokens == self.predicted_cached_tokens

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "ttft_ms": round(self.ttft_ms, 3),
            "first_divergence": self.first_divergence,
        }
        if self.divergence is not None:
            out["divergence"] = asdict(self.divergence)
        out.update(self.extra)
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The ROC AUC of ``scores`` as a classifier of ``labels``: the chance that a random positive
    scores above a random negative, ties counting half (0.5: no better than a coin)."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        raise ValueError("an AUC needs at least one positive and one negative")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@dataclass
class VariantResult:
    name: str  # "wrong" / "right" / ...
    label: str  # one line saying what the variant does
    requests: list[RequestRecord]
    counters: PrefixCounters | None = None  # the engine's own cumulative counters, delta over the run

    def summary(self) -> dict[str, Any]:
        prompt = sum(r.prompt_tokens for r in self.requests)
        cached = sum(r.cached_tokens for r in self.requests)
        ttfts = [r.ttft_ms for r in self.requests]
        return {
            "requests": len(self.requests),
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
            "ttft_ms_median": round(statistics.median(ttfts), 3) if ttfts else 0.0,
            "ttft_ms_p90": round(percentile(ttfts, 90), 3),
            "predicted_cached_tokens": sum(r.predicted_cached_tokens for r in self.requests),
            "prediction_matches": all(r.prediction_ok for r in self.requests),
        }

    def counters_agree(self) -> bool | None:
        """Do the engine's counters tell the same story as the per-request numbers?"""
        if self.counters is None:
            return None
        s = self.summary()
        return self.counters.hits == s["cached_tokens"] and self.counters.queries == s["prompt_tokens"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "requests": [r.to_json() for r in self.requests],
            "summary": self.summary(),
        }
        if self.counters is not None:
            out["engine_counters"] = {
                "prefix_cache_hits": self.counters.hits,
                "prefix_cache_queries": self.counters.queries,
                "agree_with_requests": self.counters_agree(),
            }
        return out


@dataclass(frozen=True)
class Pending:
    """One request between its prediction and the engine's answer."""

    index: int
    prompt_ids: list[int]
    prediction: Prediction


class Recorder:
    """The one measuring step, in two halves around the send: ``predict`` before the request
    goes out (the harness commits to a number first), ``record`` when the engine has answered.

    ``record`` predicts again from the token IDs the engine reports it saw, when they differ from
    the harness's rendering (a server's own chat template), records the prompt and the generated
    tokens into the cache model, and returns the request's record. The halves are apart so one
    loop serves a plain sequence (``run_variant``) and concurrent sends (lesson 4's workers).
    """

    def __init__(
        self, cache: CacheModel, decode: Callable[[Sequence[int]], str] | None, read_cache: bool = True
    ) -> None:
        """``decode=None``: no tokenizer at hand (a fleet of servers); records then carry the
        divergence position only, not its text."""
        self.cache = cache
        self.decode = decode
        self.read_cache = read_cache

    def _predict(self, prompt_ids: Sequence[int]) -> Prediction:
        if not self.read_cache:  # nothing reused: the prediction is 0 and nothing is a divergence
            return Prediction(len(prompt_ids), 0, 0, None)
        return self.cache.predict(prompt_ids)

    def predict(self, index: int, prompt_ids: Sequence[int]) -> Pending:
        return Pending(index, list(prompt_ids), self._predict(prompt_ids))

    def record(self, pending: Pending, reply: Reply, extra: dict[str, Any] | None = None) -> RequestRecord:
        prompt_ids, prediction = pending.prompt_ids, pending.prediction
        seen = reply.prompt_token_ids
        if self.read_cache and seen is not None and list(seen) != prompt_ids:
            prompt_ids = list(seen)  # predict from what the engine actually saw
            prediction = self._predict(prompt_ids)
        divergence = None
        if self.read_cache and len(self.cache) and self.decode is not None:
            reference = self.cache.sequence(prediction.source if prediction.source is not None else -1)
            divergence = explain_divergence(prompt_ids, reference, self.decode)
        self.cache.record(prompt_ids, reply.output_token_ids or ())
        return RequestRecord(
            index=pending.index,
            prompt_tokens=reply.prompt_tokens,
            cached_tokens=reply.cached_tokens,
            predicted_cached_tokens=prediction.cached_tokens,
            ttft_ms=reply.ttft_ms,
            first_divergence=prediction.common_prefix,
            divergence=divergence,
            extra=dict(extra or {}),
            reply=reply,
        )


class SaltedCaches:
    """Requests that carry their own ``cache_salt`` on one engine: one predicted cache per salt,
    as the engine keeps them (vLLM mixes the salt into the first block's hash, so two salts never
    share a block). ``None`` is the engine's shared cache."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._recorders: dict[str | None, Recorder] = {}

    def send(
        self, messages: Sequence[Message], salt: str | None, index: int, extra: dict[str, Any] | None = None
    ) -> RequestRecord:
        recorder = self._recorders.setdefault(salt, Recorder(self.backend.cache_model(), self.backend.decode))
        pending = recorder.predict(index, self.backend.render(messages))
        return recorder.record(pending, self.backend.generate(messages, cache_salt=salt), extra)


def run_variant(
    backend: Backend,
    name: str,
    label: str,
    requests: Sequence[Sequence[Message]],
    max_tokens: int = 1,
    on_request: Callable[[RequestRecord], None] | None = None,
    read_cache: bool = True,
    options: Sequence[RequestOptions | None] | None = None,
) -> VariantResult:
    """Send ``requests`` in order, from a cold cache, predicting each one's cache hit first.

    ``read_cache=False``: every request computes its whole prompt (no prefix caching), so the
    prediction is 0 for each and nothing counts as a divergence. ``options``: one per request
    (tools, a prefill, a decoding constraint: ``RequestOptions``), rendered and sent with it.
    """
    if options is not None and len(options) != len(requests):
        raise ValueError(f"{len(options)} options for {len(requests)} requests")
    backend.start_variant()
    recorder = Recorder(backend.cache_model(), backend.decode, read_cache)
    before = backend.counters()
    records: list[RequestRecord] = []
    for index, messages in enumerate(requests):
        request_options = options[index] if options is not None else None
        pending = recorder.predict(index, backend.render(messages, request_options))
        reply = backend.generate(
            messages, max_tokens=max_tokens, read_cache=read_cache, options=request_options
        )
        record = recorder.record(pending, reply)
        records.append(record)
        if on_request is not None:
            on_request(record)
    after = backend.counters()
    counters = after - before if before is not None and after is not None else None
    return VariantResult(name, label, records, counters)


def run_variants(
    backend: Backend,
    variants: Sequence[tuple[str, str, Sequence[Sequence[Message]]]],
    max_tokens: int,
    read_cache: bool = True,
    options: Mapping[str, Sequence[RequestOptions | None]] | None = None,
) -> list[VariantResult]:
    """Measure each (name, label, requests) variant in order, each from a cold cache, showing each
    request live as it completes (``harness.live``; ``read_cache=False``: with no prefix-cache
    reuse at all, see ``run_variant``; ``options``: per variant name, one per request)."""
    from harness.live import live_variant

    results: list[VariantResult] = []
    for name, label, requests in variants:
        with live_variant(console, name, len(requests)) as live:
            results.append(
                run_variant(
                    backend,
                    name,
                    label,
                    requests,
                    max_tokens,
                    on_request=live.add,
                    read_cache=read_cache,
                    options=(options or {}).get(name),
                )
            )
    return results


def compare(wrong: VariantResult, right: VariantResult) -> dict[str, Any]:
    w, r = wrong.summary(), right.summary()
    speedup = w["ttft_ms_median"] / r["ttft_ms_median"] if r["ttft_ms_median"] > 0 else 0.0
    return {
        "hit_rate_wrong": w["hit_rate"],
        "hit_rate_right": r["hit_rate"],
        "ttft_speedup_median": round(speedup, 3),
        "prediction_matches": w["prediction_matches"] and r["prediction_matches"],
    }
