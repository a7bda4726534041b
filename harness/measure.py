"""Run a lesson's request sequence through a backend and keep the engine's own numbers.

For every request the harness first *predicts* how many tokens the engine will serve from its
prefix cache (``prefix.PrefixCacheModel``), then sends it, then records the engine's count next
to the prediction. A variant starts from an empty cache, so WRONG and RIGHT are measured on
equal terms.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.backend import Backend, Message, PrefixCounters
from harness.prefix import Divergence, Prediction, PrefixCacheModel, explain_divergence


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


def run_variant(
    backend: Backend,
    name: str,
    label: str,
    requests: Sequence[Sequence[Message]],
    max_tokens: int = 1,
    on_request: Callable[[RequestRecord], None] | None = None,
    read_cache: bool = True,
) -> VariantResult:
    """Send ``requests`` in order, from a cold cache, predicting each one's cache hit first.

    ``read_cache=False``: every request computes its whole prompt (no prefix caching), so the
    prediction is 0 for each and nothing counts as a divergence.
    """
    backend.start_variant()
    model = PrefixCacheModel(backend.info.block_size)
    before = backend.counters()
    records: list[RequestRecord] = []
    for index, messages in enumerate(requests):
        prompt_ids = backend.render(messages)
        prediction = model.predict(prompt_ids) if read_cache else Prediction(len(prompt_ids), 0, 0, None)
        reply = backend.generate(messages, max_tokens=max_tokens, read_cache=read_cache)
        if read_cache and reply.prompt_token_ids is not None and list(reply.prompt_token_ids) != prompt_ids:
            # The engine rendered the chat differently from the harness: predict from what it saw.
            prompt_ids = list(reply.prompt_token_ids)
            prediction = model.predict(prompt_ids)
        divergence = None
        if read_cache and len(model):
            reference = model.sequence(prediction.source if prediction.source is not None else -1)
            divergence = explain_divergence(prompt_ids, reference, backend.decode)
        record = RequestRecord(
            index=index,
            prompt_tokens=reply.prompt_tokens,
            cached_tokens=reply.cached_tokens,
            predicted_cached_tokens=prediction.cached_tokens,
            ttft_ms=reply.ttft_ms,
            first_divergence=prediction.common_prefix,
            divergence=divergence,
        )
        model.record(prompt_ids, reply.output_token_ids or ())
        records.append(record)
        if on_request is not None:
            on_request(record)
    after = backend.counters()
    counters = after - before if before is not None and after is not None else None
    return VariantResult(name, label, records, counters)


def compare(wrong: VariantResult, right: VariantResult) -> dict[str, Any]:
    w, r = wrong.summary(), right.summary()
    speedup = w["ttft_ms_median"] / r["ttft_ms_median"] if r["ttft_ms_median"] > 0 else 0.0
    return {
        "hit_rate_wrong": w["hit_rate"],
        "hit_rate_right": r["hit_rate"],
        "ttft_speedup_median": round(speedup, 3),
        "prediction_matches": w["prediction_matches"] and r["prediction_matches"],
    }
