"""Lesson 3: an explicit cache breakpoint, for engines without automatic prefix caching.

An agent's requests mostly repeat themselves: the same instructions, tool schemas and reference
documents (thousands of tokens), then a short question that changes every time. An engine with
automatic prefix caching (vLLM's APC) notices the repetition by itself. Many serving setups
have no such thing: vLLM started with ``enable_prefix_caching=False``, older servers, a
home-built loop around ``model.forward``. There every request recomputes its whole prompt.

WRONG (no caching): the real vLLM engine, told to reuse nothing. Every request is sent with
vLLM's per-request switch ``SamplingParams(skip_reading_prefix_cache=True)``: the scheduler
skips the prefix-cache lookup, so the request prefills every token from scratch, exactly as on
an engine started with ``enable_prefix_caching=False`` (same kernels, same engine, one engine
start less); the engine reports 0 cached tokens and 0 lookups. Against a server, where the HTTP
API has no such switch, each request gets a ``cache_salt`` of its own, which nothing matches.

RIGHT (manual breakpoint): the prompt builder ends the stable part with a marker,
``// __CACHE_END__``, which promises "everything before me is identical on every request". A
small cache-aware engine (``harness.manual_cache``, transformers, the same model) cuts each
prompt at the marker, removes the marker so the model never sees it, computes the KV of the
stable part once, keeps it in a bounded store keyed by a hash of its token IDs, and for every
later request runs only the question on a copy of it. The greedy output must be exactly what a
full recompute gives; the script checks that on every request and says so.

APC (for comparison): vLLM with automatic prefix caching, the marker stripped. It needs no
marker, but it reuses whole blocks only: the stable tokens in the last, partial block before the
marker are recomputed every time. Padding the stable part to a block boundary makes the cached
prefix end exactly at the marker, and pre-warming (one request with the stable part alone, sent
before the first user) makes the first question a hit too. Both are run on the engine
(``apc_aligned``), and every APC request's cached tokens are checked against the harness's
prediction.

The misuse the marker exists to prevent: text before the marker that changes between requests
(here a retrieval timestamp slipped into the reference documents' header). The manual engine
warns with the first differing token and the request is a full miss: a breakpoint cache is all
or nothing, while APC still serves the whole blocks before the change. ``--no-demo-misuse``
leaves that request out.

The same marker maps onto provider APIs: Anthropic's ``cache_control`` on a content block is
this breakpoint; OpenAI caches long prompts automatically (in 128-token steps), so there the
layout itself, stable part first, is the breakpoint.

Run:
    python manual_cache_boundary.py                      # 8 questions + 1 misuse, default model
    python manual_cache_boundary.py --quick --json out.json
    python manual_cache_boundary.py --marker '<<CACHE>>' --no-demo-misuse --check-tokens 16
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from harness.backend import Backend, Message
from harness.cli import exit_with, lesson_main
from harness.console import console
from harness.errors import UserError
from harness.manual_cache import CACHE_MARKER, ManualCacheEngine, ManualReply, strip_marker
from harness.measure import RequestRecord, VariantResult, run_variants
from harness.model import resolve_model
from harness.prefix import cached_tokens_for, common_prefix_len, explain_divergence
from harness.report import ExampleResult, divergence_panel
from harness.scenario import SimulatedClock, system_prompt

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
VARIANT_ORDER = ("wrong", "right", "apc", "apc_aligned")

# --------------------------------------------------------------------------- the request set

DOCS_HEADER = "Reference documents:"
MISUSE_HEADER = "Reference documents (retrieved {stamp}):"  # the timestamp that must not be here

REFERENCE_DOCUMENTS: list[tuple[str, str]] = [
    (
        "services/billing/README.md",
        "The billing service turns usage records into invoices. money.py holds round_amount and "
        "the currency table; invoice.py builds invoices and their totals; tax.py computes VAT per "
        "country from the rates in tax_rates.yaml. Invoice totals are rounded once, at the end, "
        "with ROUND_HALF_UP to the currency's minor unit; line items are never rounded on their "
        "own. Supported currencies: EUR, USD, GBP and CHF with 2 decimal places, JPY with 0. Run "
        "the tests with `pytest services/billing/tests`; `-k invoice` runs only the invoice tests.",
    ),
    (
        "docs/runbooks/billing.md",
        "Wrong invoice totals in production: page the billing on-call (PagerDuty service "
        "billing-primary, Slack #billing-oncall), then stop the nightly export by turning the flag "
        "billing.invoice_export off. Do not edit issued invoices; corrections are credit notes "
        "created with scripts/credit_note.py. A release is rolled back with `deploy rollback "
        "billing`, never by force-pushing to main. After the incident, add a regression test next "
        "to the failing one and link the incident in CHANGELOG.md.",
    ),
    (
        "services/billing/flags.yaml",
        "billing.invoice_export: on (nightly export of issued invoices to the ledger)\n"
        "billing.tax_v2: off (new VAT engine, shadow mode only)\n"
        "billing.multi_currency_credit: off (credit notes in a currency other than the invoice's)\n"
        "billing.strict_rounding_checks: on (fail the build when a total differs from the sum of "
        "its rounded parts by more than one minor unit)",
    ),
]

QUESTIONS = [
    "Which tool do I use to read services/billing/money.py?",
    "What rounding mode must invoice totals use?",
    "How do I run only the invoice tests?",
    "Who do I page when invoice totals are wrong in production?",
    "Which currencies does the billing service support?",
    "May I force-push to main to undo a bad release?",
    "Which feature flag stops the nightly invoice export?",
    "How many decimal places does JPY use?",
    "What is the longest a shell command may run?",
    "Where is the VAT calculation implemented?",
    "What must I do before editing a file?",
    "How do I correct an invoice that was already issued?",
]
MISUSE_QUESTION = "Is the new VAT engine switched on?"
MISUSE_DELAY_S = 437.0  # how long after the first request the misuse request is built


def stable_part(quick: bool, stamp: str | None = None) -> str:
    """Instructions, tool schemas and reference documents: what every request starts with.

    ``stamp`` builds the misuse: a retrieval time in the documents' header, which makes this
    "stable" text different on every request that carries it.
    """
    docs = REFERENCE_DOCUMENTS[:1] if quick else REFERENCE_DOCUMENTS
    header = DOCS_HEADER if stamp is None else MISUSE_HEADER.format(stamp=stamp)
    body = "\n\n".join(f"--- {path}\n{text}" for path, text in docs)
    return f"{system_prompt(quick)}\n\n{header}\n{body}"


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
        kinds.append("pre-warm")
    for question in QUESTIONS[:questions]:
        requests.append(chat_request(stable, question, marker, padding))
        kinds.append("question")
    if misuse:
        stamp = SimulatedClock().advance(MISUSE_DELAY_S)
        stamped = stable_part(quick, stamp.strftime("%Y-%m-%d %H:%M:%S UTC"))
        requests.append(chat_request(stamped, MISUSE_QUESTION, marker, padding))
        kinds.append("misuse")
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


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    questions: int
    marker: str
    misuse: bool
    check_tokens: int
    exactness_checks: int  # 0: every request


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
    return Settings(questions, marker, bool(args.demo_misuse), int(args.check_tokens), int(checks))


# --------------------------------------------------------------------------- measuring


LABELS = {
    "wrong": "no caching: vLLM, prefix-cache reads off per request, recomputes every prompt",
    "right": "manual breakpoint: keep the KV before the marker, run only the question (transformers)",
    "apc": "vLLM automatic prefix caching, marker stripped",
    "apc_aligned": "vLLM APC, stable part padded to a block boundary and pre-warmed with one request",
}


def measure_no_caching(backend: Backend, requests: RequestSet, marker: str, max_tokens: int) -> VariantResult:
    """WRONG: every request on the vLLM engine with prefix-cache reads switched off."""
    (measured,) = run_variants(
        backend, [("wrong", LABELS["wrong"], requests.stripped(marker))], max_tokens, read_cache=False
    )
    label_kinds(measured.requests, requests.kinds)
    return measured


def label_kinds(records: Sequence[RequestRecord], kinds: Sequence[str]) -> None:
    for record, kind in zip(records, kinds, strict=True):
        record.extra["request"] = kind


def measure_manual(
    manual: ManualCacheEngine, requests: RequestSet, check_tokens: int
) -> tuple[VariantResult, list[ManualReply]]:
    """RIGHT: every request through the breakpoint engine, from an empty store."""
    manual.reset()
    stored: list[list[int]] = []  # stable parts the store holds (it is large enough to keep all)
    records: list[RequestRecord] = []
    replies: list[ManualReply] = []
    with console.status("manual breakpoint engine ...") as status:
        for index, (messages, kind) in enumerate(zip(requests.requests, requests.kinds, strict=True)):
            status.update(f"manual breakpoint engine: request {index + 1} of {len(requests.requests)}")
            prompt = manual.prepare(messages)
            # The prediction: the stable part is served when this exact stable part was stored
            # before; the breakpoint engine reuses all of it or nothing.
            predicted = prompt.prefix_len if prompt.prefix_ids in stored else 0
            reply = manual.generate(messages, max_new_tokens=check_tokens)
            reference = max(stored, key=lambda s: common_prefix_len(reply.prompt_ids, s), default=None)
            extra: dict[str, Any] = {"request": kind, "stable_tokens": reply.prefix_tokens}
            if reply.warnings:
                extra["warnings"] = reply.warnings
            records.append(
                RequestRecord(
                    index=index,
                    prompt_tokens=reply.prompt_tokens,
                    cached_tokens=reply.cached_tokens,
                    predicted_cached_tokens=predicted,
                    ttft_ms=reply.ttft_ms,
                    first_divergence=common_prefix_len(reply.prompt_ids, reference) if reference else 0,
                    divergence=(
                        explain_divergence(reply.prompt_ids, reference, manual.decode) if reference else None
                    ),
                    extra=extra,
                )
            )
            replies.append(reply)
            if reply.prefix_tokens and prompt.prefix_ids not in stored:
                stored.append(prompt.prefix_ids)
    return VariantResult("right", LABELS["right"], records), replies


def exactness_sample(records: Sequence[RequestRecord], checks: int) -> list[int]:
    """Which requests to recompute: ``checks`` of the warm ones (those the store served), evenly
    spread from the first to the last; all of them when ``checks`` is 0 or covers them."""
    warm = [r.index for r in records if r.cached_tokens > 0]
    if checks == 0 or not warm:
        return [r.index for r in records]
    if checks >= len(warm):
        return warm
    if checks == 1:
        return [warm[-1]]
    step = (len(warm) - 1) / (checks - 1)
    return [warm[round(k * step)] for k in range(checks)]


def check_exactness(
    manual: ManualCacheEngine,
    requests: RequestSet,
    variant: VariantResult,
    replies: list[ManualReply],
    new_tokens: int,
    checks: int,
) -> dict[str, Any]:
    """Run requests again with a full prefill and no store; the outputs must be identical."""
    identical = 0
    full_ttfts: list[float] = []
    sample = exactness_sample(variant.requests, checks)
    with console.status("exactness check: full recompute ...") as status:
        for done, index in enumerate(sample, 1):
            record, messages, reply = variant.requests[index], requests.requests[index], replies[index]
            status.update(f"exactness check {done} of {len(sample)}: request {index + 1}, full recompute")
            baseline = manual.generate_uncached(messages, max_new_tokens=new_tokens)
            same = baseline.prompt_ids == reply.prompt_ids and baseline.output_ids == reply.output_ids
            identical += same
            full_ttfts.append(baseline.ttft_ms)
            record.extra["identical_to_full_recompute"] = same
            record.extra["full_recompute_ttft_ms"] = round(baseline.ttft_ms, 3)
    full_median = statistics.median(full_ttfts)
    return {
        "requests": len(sample),
        "of_requests": len(replies),
        "identical": identical,
        "all_identical": identical == len(sample),
        "new_tokens": new_tokens,
        "full_recompute_ttft_ms_median": round(full_median, 3),
        "store_speedup_median": round(full_median / variant.summary()["ttft_ms_median"], 3),
    }


def kv_memory(manual: ManualCacheEngine, stable_ids: list[int]) -> dict[str, Any]:
    """Bytes per token from the model's config, checked against the stored prefix's tensors."""
    entry = next(e for e in manual.store.entries() if list(e.token_ids) == stable_ids)
    check = manual.kv_size_check(entry)
    text_config = (
        manual.config.get_text_config() if hasattr(manual.config, "get_text_config") else manual.config
    )
    return {
        "bytes_per_token": check.formula_bytes_per_token,
        "bytes_per_token_measured": check.measured_bytes_per_token,
        "formula_matches_tensors": check.ok,
        "layers": int(text_config.num_hidden_layers),
        "dtype": str(manual.model.dtype).removeprefix("torch."),
        "stable_prefix_tokens": check.tokens,
        "stable_prefix_bytes": check.measured_bytes,
        "store": manual.stats(),
    }


def marker_report(
    stable_tokens: int,
    aligned_tokens: int,
    padding: str,
    block_size: int,
    apc: VariantResult,
    aligned: VariantResult,
) -> dict[str, Any]:
    """Where the marker sat, what APC served of the stable part, and what alignment changed."""

    def warm_hits(variant: VariantResult) -> list[int]:
        # Cached tokens of the questions sent after the stable part had been computed once.
        sent = [r for r in variant.requests if r.extra.get("request") != "misuse"]
        return [r.cached_tokens for r in sent[1:] if r.extra.get("request") == "question"]

    apc_hits, aligned_hits = warm_hits(apc), warm_hits(aligned)
    first_question = next(r for r in aligned.requests if r.extra.get("request") == "question")
    long_prompt = stable_tokens + block_size  # any prompt that goes on past the marker
    exact_to_marker = cached_tokens_for(long_prompt, stable_tokens, block_size)
    return {
        "marker_at_token": stable_tokens,
        "block_size": block_size,
        "served_if_matching_exactly_to_marker": exact_to_marker,
        "lost_to_block_rounding": stable_tokens - exact_to_marker,
        "apc_cached_on_hits": sorted(set(apc_hits)),
        "apc_stable_tokens_recomputed": max(0, stable_tokens - min(apc_hits)) if apc_hits else None,
        "padding_text": padding,
        "padding_tokens": aligned_tokens - stable_tokens,
        "aligned_marker_at_token": aligned_tokens,
        "aligned_cached_on_hits": sorted(set(aligned_hits)),
        "aligned_first_question_cached": first_question.cached_tokens,
        "apc_first_question_ttft_ms": round(apc.requests[0].ttft_ms, 3),
        "aligned_first_question_ttft_ms": round(first_question.ttft_ms, 3),
    }


def misuse_report(variants: Sequence[VariantResult]) -> dict[str, Any] | None:
    """The misuse request as each engine saw it."""
    right = next(v for v in variants if v.name == "right")
    record = next((r for r in right.requests if r.extra.get("request") == "misuse"), None)
    if record is None:
        return None
    warnings = [w for w in record.extra.get("warnings", []) if "stable part changed" in w]
    out: dict[str, Any] = {
        "request_index": record.index,
        "stable_tokens": record.extra["stable_tokens"],
        "divergence_index": record.first_divergence,
        "divergence": asdict(record.divergence) if record.divergence else None,
        "warning": warnings[0] if warnings else None,
        "cached_tokens": {},
    }
    for v in variants:
        misuse = next(r for r in v.requests if r.extra.get("request") == "misuse")
        out["cached_tokens"][v.name] = misuse.cached_tokens
    return out


def run(
    backend: Backend,
    args: argparse.Namespace,
    *,
    manual: ManualCacheEngine | None = None,
) -> ExampleResult:
    """All four variants on one request set. ``backend`` must have prefix caching on (APC); WRONG
    runs on it too, with prefix-cache reads off. ``manual``: a loaded breakpoint engine to reuse
    (tests do)."""
    settings = settings_from(args)
    model = resolve_model(getattr(args, "model", None))
    plain = build_requests(settings.questions, args.quick, settings.marker, settings.misuse)
    notes = [
        f"{settings.questions} questions on one stable part"
        + (", then 1 misuse request" if settings.misuse else "")
        + "; each variant starts from an empty cache, in the order no caching, manual, APC, APC aligned",
    ]
    no_caching = measure_no_caching(backend, plain, settings.marker, args.max_tokens)
    if manual is None:
        with console.status(f"loading {model.display_name} with transformers for the breakpoint engine ..."):
            manual = ManualCacheEngine(
                model.name_or_path, settings.marker, threads=getattr(args, "threads", None)
            )
    elif manual.marker != settings.marker:
        raise ValueError(
            f"the manual engine splits at {manual.marker!r}, the requests use {settings.marker!r}"
        )
    right, replies = measure_manual(manual, plain, settings.check_tokens)
    exactness = check_exactness(
        manual, plain, right, replies, settings.check_tokens, settings.exactness_checks
    )
    stable_ids = manual.prepare(plain.requests[0]).prefix_ids
    memory = kv_memory(manual, stable_ids)

    block_size = backend.info.block_size
    stable = stable_part(args.quick)

    def stable_tokens(text: str) -> int:
        return manual.prepare(chat_request(text, "?", settings.marker)).prefix_len

    padding = block_padding(stable, block_size, stable_tokens)
    aligned_set = build_requests(
        settings.questions, args.quick, settings.marker, settings.misuse, padding=padding, prewarm=True
    )
    apc, aligned = run_variants(
        backend,
        [
            ("apc", LABELS["apc"], plain.stripped(settings.marker)),
            ("apc_aligned", LABELS["apc_aligned"], aligned_set.stripped(settings.marker)),
        ],
        args.max_tokens,
    )
    label_kinds(apc.requests, plain.kinds)
    label_kinds(aligned.requests, aligned_set.kinds)

    # One set of token IDs for all engines: the breakpoint engine's split-and-concatenate must
    # give exactly what vLLM renders from the stripped text, or the comparison is unfair.
    same_tokens = all(
        manual.prepare(messages).token_ids == backend.render(strip_marker(messages, settings.marker))
        for messages in plain.requests + aligned_set.requests
    )
    # With reads off vLLM makes no cache lookups, so its counters stay at 0 queries and 0 hits:
    # evidence that nothing was reused, but not comparable with the prompt tokens sent.
    no_cache_counters = no_caching.counters
    no_caching = replace(no_caching, counters=None)
    variants = [no_caching, right, apc, aligned]
    wrong_ttft = no_caching.summary()["ttft_ms_median"]
    speedups = {
        v.name: round(wrong_ttft / v.summary()["ttft_ms_median"], 3) if v.summary()["ttft_ms_median"] else 0.0
        for v in variants
    }
    extra: dict[str, Any] = {
        "manual_engine": {"backend": "transformers", "model": model.display_name, "marker": settings.marker},
        "ttft_speedup_vs_no_caching": speedups,
        "exactness": exactness,
        "kv_memory": memory,
        "marker": marker_report(
            stable_tokens(stable), stable_tokens(stable + padding), padding, block_size, apc, aligned
        ),
        "same_prompt_tokens_on_all_engines": same_tokens,
        "no_caching_engine_counters": (
            {"prefix_cache_queries": no_cache_counters.queries, "prefix_cache_hits": no_cache_counters.hits}
            if no_cache_counters is not None
            else None
        ),
        "misuse": misuse_report(variants),
    }
    return ExampleResult(EXAMPLE, backend.info, variants, notes=notes, extra=extra)


# --------------------------------------------------------------------------- showing it


def overview_table(result: ExampleResult) -> Table:
    table = Table(title="Lesson 3: the same requests on every engine", title_justify="left")
    for name in ("variant", "engine", "hit rate", "TTFT median ms", "TTFT p90 ms", "speedup vs no caching"):
        table.add_column(name, justify="left" if name in ("variant", "engine") else "right")
    table.add_column("prediction == engine", justify="center")
    engines = {
        "wrong": "vLLM, no prefix caching",
        "right": "transformers + breakpoint",
        "apc": "vLLM APC",
        "apc_aligned": "vLLM APC, aligned",
    }
    speedups = result.extra["ttft_speedup_vs_no_caching"]
    for v in result.variants:
        s = v.summary()
        table.add_row(
            v.name,
            engines.get(v.name, ""),
            f"{s['hit_rate']:.1%}",
            f"{s['ttft_ms_median']:,.0f}",
            f"{s['ttft_ms_p90']:,.0f}",
            f"{speedups[v.name]:.1f}x",
            "[green]yes[/]" if s["prediction_matches"] else "[bold red]NO[/]",
        )
    return table


def show_details(result: ExampleResult) -> None:
    """The four engines side by side, then exactness, the marker vs APC's blocks, memory, misuse."""
    e = result.extra
    console.print(overview_table(result))
    x, m, k = e["exactness"], e["marker"], e["kv_memory"]
    verdict = "[green]identical[/]" if x["all_identical"] else "[bold red]NOT identical[/]"
    console.print(
        f"Exactness: {x['identical']} of {x['requests']} requests checked (of {x['of_requests']}) gave "
        f"{verdict} greedy output "
        f"({x['new_tokens']} new tokens) with the stored prefix KV and with a full recompute of the "
        f"same token IDs. The full recompute on the same transformers engine had a median TTFT of "
        f"{x['full_recompute_ttft_ms_median']:,.0f} ms: the stored prefix alone is worth "
        f"[bold]{x['store_speedup_median']:.1f}x[/] there."
    )
    same = "[green]yes[/]" if e["same_prompt_tokens_on_all_engines"] else "[bold red]NO[/]"
    console.print(f"Same prompt token IDs on the breakpoint engine and on vLLM: {same}")
    counters = e["no_caching_engine_counters"]
    if counters is not None:
        console.print(
            f"The engine's own counters during WRONG: {counters['prefix_cache_queries']:,} prefix-cache "
            f"lookups, {counters['prefix_cache_hits']:,} hits"
            + (": with reads off it never looks." if not counters["prefix_cache_queries"] else ".")
        )
    console.print(
        Panel(
            f"The marker sat after token [bold]{m['marker_at_token']:,}[/] (the stable part). vLLM keeps "
            f"whole blocks of {m['block_size']} tokens, so a prompt matching exactly up to the marker "
            f"gets {m['served_if_matching_exactly_to_marker']:,} served and recomputes "
            f"[red]{m['lost_to_block_rounding']}[/] stable tokens every request. Measured: APC served "
            f"{', '.join(f'{c:,}' for c in m['apc_cached_on_hits'])} tokens on its hits.\n"
            f"Padded with {m['padding_tokens']} filler tokens ({m['padding_text']!r}) the marker sits "
            f"after token {m['aligned_marker_at_token']:,}, a block boundary: APC served "
            f"{', '.join(f'{c:,}' for c in m['aligned_cached_on_hits'])}, the whole stable part. "
            "Pre-warming with one stable-only request made the first question a hit: TTFT "
            f"{m['aligned_first_question_ttft_ms']:,.0f} ms instead of "
            f"{m['apc_first_question_ttft_ms']:,.0f} ms cold.",
            title="The marker on an engine with automatic prefix caching",
            title_align="left",
        )
    )
    matches = "[green](matches)[/]" if k["formula_matches_tensors"] else "[bold red](does NOT match)[/]"
    console.print(
        f"Stored prefix KV: {k['bytes_per_token']:,} bytes per token (K and V of every layer and KV head, "
        f"{k['layers']} layers, {k['dtype']}; from the model config); the "
        f"{k['stable_prefix_tokens']:,}-token stable part holds {k['stable_prefix_bytes'] / 2**20:,.1f} "
        f"MiB of tensors {matches}. The store holds {k['store']['entries']} prefixes, "
        f"{k['store']['bytes_stored'] / 2**20:,.1f} MiB."
    )
    misuse = e["misuse"]
    if misuse is None:
        return
    record = result.variant("right").requests[misuse["request_index"]]
    console.print(f"[bold yellow]warning:[/] {escape(misuse['warning'] or 'no warning was raised')}")
    console.print(
        divergence_panel(record, f"MISUSE request {misuse['request_index']}: the 'stable' part changed")
    )
    cached = misuse["cached_tokens"]
    console.print(
        f"Counted as a miss: the breakpoint engine served [red]{cached['right']:,}[/] tokens for it (its "
        f"cache is all or nothing) and stored a second prefix of {misuse['stable_tokens']:,} tokens "
        f"({misuse['stable_tokens'] * k['bytes_per_token'] / 2**20:,.1f} MiB); a timestamp on every request "
        f"would fill the store with prefixes used once. vLLM APC still served {cached['apc']:,}, the whole "
        "blocks before the change. Keep clocks and other per-request facts after the marker."
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
