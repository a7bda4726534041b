"""Lesson 3: an explicit cache breakpoint, for engines without automatic prefix caching.

An agent's requests mostly repeat themselves: the same instructions, tool schemas and reference
documents (thousands of tokens), then a short question that changes every time. An engine with
automatic prefix caching (vLLM's APC) notices the repetition by itself. Many serving setups
have no such thing: vLLM started with ``enable_prefix_caching=False``, older servers, a
home-built loop around ``model.forward``. There every request recomputes its whole prompt.

WRONG (no caching): the real vLLM engine, told to reuse nothing. Every request is sent with
vLLM's per-request switch ``SamplingParams(skip_reading_prefix_cache=True)``: the scheduler
skips the prefix-cache lookup and the request prefills every token, exactly as on an engine
started with ``enable_prefix_caching=False``, without starting a second engine (against a
server: a ``cache_salt`` of its own per request, which nothing matches).

RIGHT (manual breakpoint): the prompt builder ends the stable part with a marker,
``// __CACHE_END__``, which promises "everything before me is identical on every request". A
small cache-aware engine (``harness.manual_cache``, transformers, the same model) cuts each
prompt at the marker, removes the marker so the model never sees it, computes the KV of the
stable part once, keeps it in a bounded store keyed by a hash of its token IDs, and for every
later request runs only the question on a copy of it. The greedy output must be exactly what a
full recompute gives; the lesson checks that.

APC (for comparison): vLLM with automatic prefix caching, the marker stripped. It needs no
marker, but it reuses whole blocks only: the stable tokens in the last, partial block before the
marker are recomputed every time. ``apc_aligned`` pads the stable part to a block boundary, so
the cached prefix ends exactly at the marker, and pre-warms (one request with the stable part
alone, before the first user), so the first question is a hit too.

The two cache rules, side by side; the harness predicts every request with its engine's rule
before sending it, and the engine's own count must match on every request:

* APC, whole blocks, chained (``harness.prefix.PrefixCacheModel``): a prompt of L tokens sharing
  its first P with something cached gets B * floor(min(P, L - 1) / B) tokens served.
* The breakpoint, all or nothing at the marker (``harness.manual_cache.BreakpointCacheModel``):
  a prompt whose S tokens before the marker an earlier request stored gets all S; otherwise 0.

The misuse the marker exists to prevent: text before the marker that changes between requests
(a retrieval timestamp in the documents' header). The breakpoint engine warns with the first
differing token and serves nothing; APC still serves the whole blocks before the change.

Two engines, so two ratios: the headline speedup sets the breakpoint engine (transformers)
against vLLM without caching; the same-engine one sets transformers with the stored prefix
against transformers recomputing the same requests in full. Every variant's hit rate and TTFT
cover the same requests: the questions and the misuse (``apc_aligned``'s pre-warm is not counted).

On provider APIs the marker is Anthropic's ``cache_control`` breakpoint; OpenAI caches long
prompts automatically, so there the layout itself, stable part first, is the breakpoint.

Run:
    python manual_cache_boundary.py                      # 8 questions + 1 misuse, default model
    python manual_cache_boundary.py --quick --json out.json
    python manual_cache_boundary.py --marker '<<CACHE>>' --no-demo-misuse --check-tokens 16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from harness.backend import Backend, Message, PrefixCounters
from harness.cli import exit_with, lesson_main
from harness.console import Panel, Table, console, escape, mark
from harness.errors import UserError
from harness.manual_cache import (
    CACHE_MARKER,
    BreakpointBackend,
    ExactnessCheck,
    KVMemory,
    ManualCacheEngine,
    ManualReply,
    check_exactness,
    strip_marker,
)
from harness.measure import RequestRecord, VariantResult, run_variants
from harness.model import resolve_model
from harness.prefix import cached_tokens_for
from harness.report import ExampleResult, divergence_panel
from harness.scenario import SimulatedClock, system_prompt
from harness.scenario_documents import (
    DOCUMENTS_HEADER,
    MISUSE_DELAY_S,
    MISUSE_QUESTION,
    QUESTIONS,
    documents_body,
)

EXAMPLE = "manual_cache_boundary"
# The per-request column the tables add (run_all_examples.py passes it to report.show too).
TABLE_COLUMNS = ("request",)
DEFAULT_QUESTIONS = 8
QUICK_QUESTIONS = 4
DEFAULT_CHECK_TOKENS = 8
# The exactness check recomputes a request in full on transformers: about as slow as the
# no-caching engine. A few warm requests spread over the run show it; 0 checks every request.
DEFAULT_EXACTNESS_CHECKS = 3
PAD_UNIT = " ."  # one token per copy after ordinary text (the search below does not rely on it)
QUESTION, MISUSE, PREWARM = "question", "misuse", "pre-warm"  # what each request is

# --------------------------------------------------------------------------- WRONG and RIGHT


def stable_part(quick: bool, stamp: str | None = None) -> str:
    """Instructions, tool schemas and reference documents: what every request starts with.

    ``stamp`` builds the misuse: a retrieval time in the documents' header, which makes this
    "stable" text different on every request that carries it.
    """
    header = DOCUMENTS_HEADER if stamp is None else f"{DOCUMENTS_HEADER} (retrieved {stamp})"
    return f"{system_prompt(quick)}\n\n{header}:\n{documents_body(quick)}"


def chat_request(stable: str, question: str, marker: str, padding: str = "") -> list[Message]:
    """The layout the lesson teaches: the stable part, the marker right after it, then the question."""
    return [
        {"role": "system", "content": stable + padding + marker},
        {"role": "user", "content": question},
    ]


@dataclass(frozen=True)
class RequestSet:
    """The requests of one variant, in order, and what each one is (question, misuse, pre-warm)."""

    requests: list[list[Message]]
    kinds: list[str]

    def stripped(self, marker: str) -> list[list[Message]]:
        """What an engine without markers is sent: the same text, marker removed."""
        return [strip_marker(messages, marker) for messages in self.requests]


def build_requests(
    questions: int, quick: bool, marker: str, misuse: bool, padding: str = "", prewarm: bool = False
) -> RequestSet:
    """``questions`` user questions on one stable part; optionally a pre-warm request first (the
    stable part with an empty question) and the misuse request last."""
    stable = stable_part(quick)
    requests, kinds = [], []
    if prewarm:
        requests.append(chat_request(stable, "", marker, padding))
        kinds.append(PREWARM)
    for question in QUESTIONS[:questions]:
        requests.append(chat_request(stable, question, marker, padding))
        kinds.append(QUESTION)
    if misuse:
        stamp = SimulatedClock().advance(MISUSE_DELAY_S)
        stamped = stable_part(quick, stamp.strftime("%Y-%m-%d %H:%M:%S UTC"))
        requests.append(chat_request(stamped, MISUSE_QUESTION, marker, padding))
        kinds.append(MISUSE)
    return RequestSet(requests, kinds)


def block_padding(stable: str, block_size: int, stable_tokens: Callable[[str], int]) -> str:
    """The shortest run of ``PAD_UNIT`` after ``stable`` that ends it on a block boundary.

    ``stable_tokens`` counts the tokens of the stable part as the engine runs them (chat
    template included); the search does not assume one token per copy, only that some length
    lands on the boundary.
    """
    for copies in range(4 * block_size):
        padding = PAD_UNIT * copies
        if stable_tokens(stable + padding) % block_size == 0:
            return padding
    raise RuntimeError(f"no run of {PAD_UNIT!r} aligns the stable part to {block_size}-token blocks")


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Variant:
    engine: str  # for the overview table
    label: str  # one line saying what the variant does


VARIANTS = {
    "wrong": Variant(
        "vLLM, no prefix caching",
        "no caching: vLLM, prefix-cache reads off per request, recomputes every prompt",
    ),
    "right": Variant(
        "transformers + breakpoint",
        "manual breakpoint: keep the KV before the marker, run only the question (transformers)",
    ),
    "right_auto": Variant(
        "transformers + found breakpoint",
        "manual breakpoint at the place the span detector found (where the requests differ), not by hand",
    ),
    "apc": Variant("vLLM APC", "vLLM automatic prefix caching, marker stripped"),
    "apc_aligned": Variant(
        "vLLM APC, aligned",
        "vLLM APC, stable part padded to a block boundary and pre-warmed with one request",
    ),
}


@dataclass(frozen=True)
class Measured:
    """One variant's records beside the request set it sent, so requests are found by kind."""

    result: VariantResult
    sent: RequestSet

    def records(self, *kinds: str) -> list[RequestRecord]:
        return [r for r, k in zip(self.result.requests, self.sent.kinds, strict=True) if k in kinds]

    def compared(self) -> VariantResult:
        """The requests every variant sends, the questions and the misuse: what the comparison covers."""
        return VariantResult(self.result.name, self.result.label, self.records(QUESTION, MISUSE))


def measure(
    backend: Backend,
    name: str,
    sent: RequestSet,
    messages: Sequence[Sequence[Message]],
    max_tokens: int,
    read_cache: bool = True,
) -> Measured:
    """One variant through the one measuring step (predict, send, record), from a cold cache."""
    (result,) = run_variants(backend, [(name, VARIANTS[name].label, messages)], max_tokens, read_cache)
    for record, kind in zip(result.requests, sent.kinds, strict=True):
        record.extra["request"] = kind
    return Measured(result, sent)


def measure_breakpoint(
    args: argparse.Namespace, settings: Settings, sent: RequestSet, loaded: ManualCacheEngine | None
) -> tuple[Measured, ExactnessCheck, BreakpointBackend]:
    """RIGHT on the breakpoint engine (``loaded``: one already loaded, tests pass it), then the same
    requests recomputed in full on the same engine: the output must not change, the time does."""
    model = resolve_model(getattr(args, "model", None))
    marker, tokens = settings.marker, settings.check_tokens
    if loaded is None:
        with console.status(f"loading {model.display_name} with transformers for the breakpoint engine ..."):
            loaded = ManualCacheEngine(model.name_or_path, marker, threads=getattr(args, "threads", None))
    elif loaded.marker != marker:
        raise ValueError(f"the manual engine splits at {loaded.marker!r}, the requests use {marker!r}")
    manual = BreakpointBackend(loaded, model.display_name)
    right = measure(manual, "right", sent, sent.requests, tokens)
    manual.annotate(right.result.requests)
    with console.status("exactness check: the same requests, full recompute ..."):
        exactness = check_exactness(loaded, sent.requests, manual.replies, tokens, settings.exactness_checks)
    exactness.annotate(right.result.requests)
    return right, exactness, manual


def run(
    backend: Backend, args: argparse.Namespace, *, manual: ManualCacheEngine | None = None
) -> BoundaryResult:
    """All four variants on one request set, each from an empty cache, in the order no caching,
    breakpoint, APC, APC aligned. ``backend`` must have prefix caching on (APC); WRONG runs on it
    too, with prefix-cache reads off. ``manual``: a loaded breakpoint engine to reuse (tests do)."""
    settings = settings_from(args)
    plain = build_requests(settings.questions, args.quick, settings.marker, settings.misuse)
    stripped = plain.stripped(settings.marker)
    wrong = measure(backend, "wrong", plain, stripped, args.max_tokens, read_cache=False)
    right, exactness, manual_backend = measure_breakpoint(args, settings, plain, manual)
    engine = manual_backend.engine
    # read before the found-marker run below empties the store
    kv_memory = engine.kv_memory(engine.prepare(plain.requests[0]).prefix_ids)
    model_path = resolve_model(getattr(args, "model", None)).name_or_path
    auto = (
        measure_auto_boundary(settings, plain, manual_backend, model_path) if settings.auto_boundary else None
    )

    def stable_tokens(text: str) -> int:
        return engine.prepare(chat_request(text, "?", settings.marker)).prefix_len

    stable, block_size = stable_part(args.quick), backend.info.block_size
    padding = block_padding(stable, block_size, stable_tokens)
    aligned_set = build_requests(
        settings.questions, args.quick, settings.marker, settings.misuse, padding=padding, prewarm=True
    )
    apc = measure(backend, "apc", plain, stripped, args.max_tokens)
    aligned_stripped = aligned_set.stripped(settings.marker)
    aligned = measure(backend, "apc_aligned", aligned_set, aligned_stripped, args.max_tokens)

    # With reads off vLLM makes no cache lookups, so its counters stay at 0 queries and 0 hits:
    # evidence that nothing was reused, but not comparable with the prompt tokens sent.
    no_caching_counters = wrong.result.counters
    wrong = replace(wrong, result=replace(wrong.result, counters=None))
    measured = [wrong, right, *([auto[0]] if auto else []), apc, aligned]
    notes = [
        f"{settings.questions} questions on one stable part"
        + (", then 1 misuse request" if settings.misuse else "")
        + "; each variant starts from an empty cache, in the order no caching, manual, APC, APC aligned",
    ]
    return BoundaryResult(
        EXAMPLE,
        backend.info,
        [m.result for m in measured],
        notes=notes,
        manual_model=manual_backend.info.model,
        marker=settings.marker,
        compared=[m.compared() for m in measured],
        exactness=exactness,
        kv_memory=kv_memory,
        alignment=MarkerAlignment.of(
            stable_tokens(stable), block_size, padding, stable_tokens(stable + padding), apc, aligned
        ),
        same_prompt_tokens=all(
            engine.prepare(messages).token_ids == backend.render(strip_marker(messages, settings.marker))
            for messages in plain.requests + aligned_set.requests
        ),
        no_caching_counters=no_caching_counters,
        misuse=Misuse.of(measured, manual_backend) if settings.misuse else None,
        auto_boundary=auto[1] if auto else None,
    )


def measure_auto_boundary(
    settings: Settings, plain: RequestSet, manual: BreakpointBackend, model_path: str
) -> tuple[Measured, AutoBoundary]:
    """The breakpoint engine with its marker where the traffic shows the stable part ends: the
    explainer's span detector, run on the questions without a marker (``--auto-boundary``)."""
    from harness.explain.render import ChatRenderer
    from harness.explain.spans import place_marker, stable_boundary

    questions = [
        strip_marker(m, settings.marker)
        for m, k in zip(plain.requests, plain.kinds, strict=True)
        if k == QUESTION
    ]
    with console.status("finding the stable part from the requests (the explainer's span detector) ..."):
        boundary = stable_boundary(questions, ChatRenderer(model_path))
    placed = RequestSet(
        [place_marker(strip_marker(m, settings.marker), boundary, settings.marker) for m in plain.requests],
        plain.kinds,
    )
    measured = measure(manual, "right_auto", placed, placed.requests, settings.check_tokens)
    manual.annotate(measured.result.requests)
    return measured, AutoBoundary(boundary.stable_tokens, boundary.message_index, boundary.offset)


@dataclass(frozen=True)
class AutoBoundary:
    """Where the span detector put the marker (--auto-boundary)."""

    stable_tokens: int  # every question starts with these tokens
    message_index: int
    offset: int  # characters into that message

    def to_json(self) -> dict[str, Any]:
        return {
            "stable_tokens": self.stable_tokens,
            "message_index": self.message_index,
            "offset": self.offset,
        }


# --------------------------------------------------------------------------- what it found


@dataclass(frozen=True)
class MarkerAlignment:
    """Where the marker sat, what APC served of the stable part, and what alignment changed."""

    marker_at_token: int  # tokens before the marker: the stable part
    block_size: int
    padding_text: str
    aligned_marker_at_token: int  # the same, padded
    apc_cached_on_hits: list[int]  # distinct counts served on the questions after the first request
    aligned_cached_on_hits: list[int]
    aligned_first_question_cached: int  # after the pre-warm request
    apc_first_question_ttft_ms: float  # cold
    aligned_first_question_ttft_ms: float

    @classmethod
    def of(
        cls, stable: int, block_size: int, padding: str, aligned_stable: int, apc: Measured, aligned: Measured
    ) -> MarkerAlignment:
        def warm_hits(variant: Measured) -> list[int]:
            return sorted({r.cached_tokens for r in variant.records(QUESTION) if r.index > 0})

        apc_first, aligned_first = apc.records(QUESTION)[0], aligned.records(QUESTION)[0]
        hits = (warm_hits(apc), warm_hits(aligned))
        firsts = (aligned_first.cached_tokens, apc_first.ttft_ms, aligned_first.ttft_ms)
        return cls(stable, block_size, padding, aligned_stable, *hits, *firsts)

    @property
    def served_to_marker(self) -> int:
        """What a prompt going on past the marker gets when it matches exactly up to the marker."""
        at = self.marker_at_token
        return cached_tokens_for(at + self.block_size, at, self.block_size)

    def to_json(self) -> dict[str, Any]:
        hits, at = self.apc_cached_on_hits, self.marker_at_token
        return {
            **asdict(self),
            "served_if_matching_exactly_to_marker": self.served_to_marker,
            "lost_to_block_rounding": at - self.served_to_marker,
            "apc_stable_tokens_recomputed": max(0, at - min(hits)) if hits else None,
            "padding_tokens": self.aligned_marker_at_token - at,
            "apc_first_question_ttft_ms": round(self.apc_first_question_ttft_ms, 3),
            "aligned_first_question_ttft_ms": round(self.aligned_first_question_ttft_ms, 3),
        }


@dataclass(frozen=True)
class Misuse:
    """The request with a timestamp before the marker, as each engine saw it."""

    record: RequestRecord  # RIGHT's
    reply: ManualReply  # the breakpoint engine's, with its warning
    cached_tokens: dict[str, int]  # per variant

    @classmethod
    def of(cls, measured: Sequence[Measured], manual: BreakpointBackend) -> Misuse:
        (record,) = next(m for m in measured if m.result.name == "right").records(MISUSE)
        cached = {m.result.name: m.records(MISUSE)[0].cached_tokens for m in measured}
        return cls(record, manual.replies[record.index], cached)

    @property
    def warning(self) -> str | None:
        return next((w for w in self.reply.warnings if "stable part changed" in w), None)

    def to_json(self) -> dict[str, Any]:
        d = self.record.divergence
        return {
            "request_index": self.record.index,
            "stable_tokens": self.reply.prefix_tokens,
            "divergence_index": self.record.first_divergence,
            "divergence": asdict(d) if d else None,
            "warning": self.warning,
            "cached_tokens": self.cached_tokens,
        }


@dataclass
class BoundaryResult(ExampleResult):
    """The shared result plus lesson 3's own findings, typed until the JSON."""

    manual_model: str = field(kw_only=True)
    marker: str = field(kw_only=True)
    compared: list[VariantResult] = field(kw_only=True)  # every variant over the same requests
    exactness: ExactnessCheck = field(kw_only=True)  # and the same-engine speedup
    kv_memory: KVMemory = field(kw_only=True)
    alignment: MarkerAlignment = field(kw_only=True)
    same_prompt_tokens: bool = field(kw_only=True)  # on the breakpoint engine and on vLLM
    no_caching_counters: PrefixCounters | None = field(kw_only=True)
    misuse: Misuse | None = field(kw_only=True)
    auto_boundary: AutoBoundary | None = field(kw_only=True, default=None)

    def compared_requests(self) -> str:
        """Which requests every variant's hit rate and TTFT cover, in words."""
        questions = len(self.compared[0].requests) - (1 if self.misuse else 0)
        misuse = ", 1 misuse" if self.misuse else ""
        return f"{questions} questions{misuse}; apc_aligned's pre-warm request not counted"

    def speedups(self) -> dict[str, float]:
        """TTFT median of no caching over each variant's, over the same requests."""
        medians = {v.name: v.summary()["ttft_ms_median"] for v in self.compared}
        return {name: round(medians["wrong"] / m, 3) if m else 0.0 for name, m in medians.items()}

    def to_json(self) -> dict[str, Any]:
        counters = self.no_caching_counters
        return {
            **super().to_json(),
            "manual_engine": {"backend": "transformers", "model": self.manual_model, "marker": self.marker},
            "same_requests": {
                "requests": self.compared_requests(),
                "variants": {v.name: v.summary() for v in self.compared},
            },
            "ttft_speedup_vs_no_caching": self.speedups(),
            "same_engine_speedup": self.exactness.same_engine_json(),
            "exactness": self.exactness.to_json(),
            "kv_memory": self.kv_memory.to_json(),
            "marker": self.alignment.to_json(),
            "same_prompt_tokens_on_all_engines": self.same_prompt_tokens,
            "no_caching_engine_counters": (
                {"prefix_cache_queries": counters.queries, "prefix_cache_hits": counters.hits}
                if counters is not None
                else None
            ),
            "misuse": self.misuse.to_json() if self.misuse else None,
            "auto_boundary": self.auto_boundary.to_json() if self.auto_boundary else None,
        }


# --------------------------------------------------------------------------- showing it


def overview_table(result: BoundaryResult) -> Table:
    title = f"Lesson 3: the same requests on every engine ({result.compared_requests()})"
    table = Table(title=title, title_justify="left")
    for name in ("variant", "engine", "hit rate", "TTFT median ms", "TTFT p90 ms", "speedup vs no caching"):
        table.add_column(name, justify="left" if name in ("variant", "engine") else "right")
    table.add_column("prediction == engine", justify="center")
    speedups = result.speedups()
    for v in result.compared:
        s = v.summary()
        table.add_row(
            v.name,
            VARIANTS[v.name].engine,
            f"{s['hit_rate']:.1%}",
            f"{s['ttft_ms_median']:,.0f}",
            f"{s['ttft_ms_p90']:,.0f}",
            f"{speedups[v.name]:.1f}x",
            mark(all(r.prediction_ok for r in result.variant(v.name).requests)),  # every request sent
        )
    return table


def show_engines(result: BoundaryResult) -> None:
    """The comparison, what the stored prefix is worth on its own engine, and that it is exact."""
    console.print(overview_table(result))
    aligned = result.variant("apc_aligned").summary()
    console.print(
        f"[dim]apc_aligned with its pre-warm request counted ({aligned['requests']} requests): hit rate "
        f"{aligned['hit_rate']:.1%}, TTFT median {aligned['ttft_ms_median']:,.0f} ms.[/]"
    )
    x = result.exactness
    console.print(
        "Same engine: the speedups above set transformers against vLLM. On transformers alone the same "
        f"{x.requests} requests ({', '.join(map(str, x.checked))}) took "
        f"{x.full_recompute_ttft_ms_median:,.0f} ms recomputed in full and "
        f"{x.stored_prefix_ttft_ms_median:,.0f} ms on the stored prefix (medians): "
        f"[bold]{x.same_engine_speedup:.1f}x[/] for the breakpoint alone."
    )
    verdict = "[green]identical[/]" if x.all_identical else "[bold red]NOT identical[/]"
    console.print(
        f"Exactness: {x.identical} of {x.requests} requests checked (of {x.of_requests}) gave {verdict} "
        f"greedy output ({x.new_tokens} new tokens) with the stored prefix KV and with a full recompute "
        "of the same token IDs."
    )
    same = mark(result.same_prompt_tokens)
    console.print(f"Same prompt token IDs on the breakpoint engine and on vLLM: {same}")
    counters = result.no_caching_counters
    if counters is not None:
        console.print(
            f"The engine's own counters during WRONG: {counters.queries:,} prefix-cache lookups, "
            f"{counters.hits:,} hits" + (": with reads off it never looks." if not counters.queries else ".")
        )


def show_alignment(a: MarkerAlignment) -> None:
    at, aligned_at = a.marker_at_token, a.aligned_marker_at_token
    apc_hits, aligned_hits = (
        ", ".join(f"{c:,}" for c in hits) for hits in (a.apc_cached_on_hits, a.aligned_cached_on_hits)
    )
    body = (
        f"The marker sat after token [bold]{at:,}[/] (the stable part). vLLM keeps whole blocks of "
        f"{a.block_size} tokens, so a prompt matching exactly up to the marker gets {a.served_to_marker:,} "
        f"served and recomputes [red]{at - a.served_to_marker}[/] stable tokens every request. "
        f"Measured: APC served {apc_hits} tokens on its hits.\n"
        f"Padded with {aligned_at - at} filler tokens ({a.padding_text!r}) the marker sits after token "
        f"{aligned_at:,}, a block boundary: APC served {aligned_hits}, the whole stable part. Pre-warming "
        "with one stable-only request made the first question a hit: TTFT "
        f"{a.aligned_first_question_ttft_ms:,.0f} ms instead of {a.apc_first_question_ttft_ms:,.0f} ms cold."
    )
    title = "The marker on an engine with automatic prefix caching"
    console.print(Panel(body, title=title, title_align="left"))


def show_memory(k: KVMemory) -> None:
    matches = "[green](matches)[/]" if k.size.ok else "[bold red](does NOT match)[/]"
    console.print(
        f"Stored prefix KV: {k.size.formula_bytes_per_token:,} bytes per token (K and V of every layer and "
        f"KV head, {k.layers} layers, {k.dtype}; from the model config); the {k.size.tokens:,}-token stable "
        f"part holds {k.size.measured_bytes / 2**20:,.1f} MiB of tensors {matches}. The store holds "
        f"{k.store.entries} prefixes, {k.store.bytes_stored / 2**20:,.1f} MiB."
    )


def show_misuse(misuse: Misuse, bytes_per_token: int) -> None:
    index, stable = misuse.record.index, misuse.reply.prefix_tokens
    console.print(f"[bold yellow]warning:[/] {escape(misuse.warning or 'no warning was raised')}")
    console.print(divergence_panel(misuse.record, f"MISUSE request {index}: the 'stable' part changed"))
    cached = misuse.cached_tokens
    console.print(
        f"Counted as a miss: the breakpoint engine served [red]{cached['right']:,}[/] tokens for it (its "
        f"cache is all or nothing) and stored a second prefix of {stable:,} tokens "
        f"({stable * bytes_per_token / 2**20:,.1f} MiB); a timestamp on every request would fill the store "
        f"with prefixes used once. vLLM APC still served {cached['apc']:,}, the whole blocks before the "
        "change. Keep clocks and other per-request facts after the marker."
    )


def show_auto_boundary(result: BoundaryResult) -> None:
    b = result.auto_boundary
    assert b is not None
    hand, found = (v.summary() for v in result.compared if v.name in ("right", "right_auto"))
    console.print(
        "--auto-boundary: the span detector found the questions share their first "
        f"{b.stable_tokens:,} tokens and put the marker in message {b.message_index}, {b.offset:,} "
        f"characters in (by hand: after token {result.alignment.marker_at_token:,}). Hit rate with the "
        f"found marker [bold]{found['hit_rate']:.1%}[/], with the hand-placed one "
        f"{hand['hit_rate']:.1%}, over the same requests."
    )


def headline(result: ExampleResult) -> str:
    """The lesson's own figure, for the runner's summary: the breakpoint on its own engine."""
    if not isinstance(result, BoundaryResult):
        return ""
    aligned = result.speedups()["apc_aligned"]
    return f"same engine {result.exactness.same_engine_speedup:.1f}x; vLLM APC aligned {aligned:.1f}x"


def show_details(result: ExampleResult) -> None:
    """The four engines side by side, then exactness, the marker vs APC's blocks, memory, misuse."""
    if not isinstance(result, BoundaryResult):
        raise TypeError(f"lesson 3 shows its own results, got {type(result).__name__}")
    show_engines(result)
    if result.auto_boundary is not None:
        show_auto_boundary(result)
    show_alignment(result.alignment)
    show_memory(result.kv_memory)
    if result.misuse is not None:
        show_misuse(result.misuse, result.kv_memory.size.formula_bytes_per_token)


# --------------------------------------------------------------------------- the flags


@dataclass(frozen=True)
class Settings:
    questions: int
    marker: str
    misuse: bool
    check_tokens: int
    exactness_checks: int  # 0: every request
    auto_boundary: bool  # also run the breakpoint with the marker the span detector places


def add_lesson_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("lesson 3")
    g.add_argument(
        "--questions",
        type=int,
        default=None,
        help=f"user questions on the shared stable part (2-{len(QUESTIONS)}; default "
        f"{DEFAULT_QUESTIONS}, {QUICK_QUESTIONS} with --quick)",
    )
    g.add_argument(
        "--marker",
        default=CACHE_MARKER,
        help=f"the cache breakpoint written after the stable part (default {CACHE_MARKER!r})",
    )
    g.add_argument(
        "--demo-misuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end with one request whose 'stable' part carries a timestamp, to show the warning "
        "and the miss (default: on)",
    )
    g.add_argument(
        "--check-tokens",
        type=int,
        default=DEFAULT_CHECK_TOKENS,
        help="new tokens the manual engine generates per request, with the stored prefix and with a "
        f"full recompute, to check they are identical (default {DEFAULT_CHECK_TOKENS})",
    )
    g.add_argument(
        "--auto-boundary",
        action="store_true",
        help="also run the breakpoint engine with the marker placed by the explainer's span detector "
        "(where the requests start to differ) instead of by hand, and show both hit rates",
    )
    g.add_argument(
        "--exactness-checks",
        type=int,
        default=None,
        metavar="N",
        help="requests to recompute in full for that check, spread over the warm ones (0: all; "
        f"default {DEFAULT_EXACTNESS_CHECKS}, all with --quick)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The lesson's flags, checked; bad input fails here, before any engine starts."""
    questions = int(args.questions or (QUICK_QUESTIONS if args.quick else DEFAULT_QUESTIONS))
    if not 2 <= questions <= len(QUESTIONS):
        raise UserError(
            f"--questions must be between 2 and {len(QUESTIONS)} (a cache can only help from the "
            f"second), got {questions}"
        )
    if args.check_tokens < 1:
        raise UserError(f"--check-tokens must be at least 1, got {args.check_tokens}")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    checks = args.exactness_checks
    if checks is None:
        checks = 0 if args.quick else DEFAULT_EXACTNESS_CHECKS
    if checks < 0:
        raise UserError(f"--exactness-checks must be 0 (all) or more, got {checks}")
    marker = str(args.marker)
    if not marker.strip():
        raise UserError("--marker must be a non-empty string")
    texts = [stable_part(args.quick), stable_part(args.quick, "0"), PAD_UNIT * 2, *QUESTIONS, MISUSE_QUESTION]
    if any(marker in text for text in texts):
        # The engine cuts at the last copy: a marker that also occurs in the prompt's own text
        # would cut somewhere else than where the builder put it.
        raise UserError(
            f"--marker {marker!r} occurs in the prompt text itself; choose a string that does not"
        )
    return Settings(
        questions,
        marker,
        bool(args.demo_misuse),
        int(args.check_tokens),
        int(checks),
        bool(getattr(args, "auto_boundary", False)),
    )


def main(argv: list[str] | None = None) -> int:
    # settings_from checks the flags first: bad input fails before the engine starts.
    return lesson_main(
        argv,
        __doc__,
        add_args=add_lesson_args,
        check_args=settings_from,
        run=run,
        show_details=show_details,
        table_columns=TABLE_COLUMNS,
    )


if __name__ == "__main__":
    exit_with(main)
