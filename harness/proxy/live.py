"""The live explanation: one console line per call, from the explainer itself, off the request path.

The analysis runs in its own process (``spawn``; Linux's idle scheduling class: it runs only on
CPU time nothing else wants) and reads the log as it grows, line by line, in the order sent: the
log is its queue. The proxy neither waits for it nor does anything for it (no queue to feed, no
copy of a record held): however far behind it falls, on a saturated machine, the records wait on
disk and it catches up when the CPU is free. vLLM's chat rendering takes 10-20 s to load: traffic
flows meanwhile. At Ctrl-C it reads to the end of the log before its summary.

Per record the worker does what ``python -m harness.explain`` does per line, incrementally: the
record is read by the explainer's ``RecordReader`` (a Responses API ``previous_response_id``
resolved from the earlier records, as the server resolves it) and goes through one
``harness.explain.run.LogRun``, which keeps each session's state, the providers' caches and
running totals (nothing is re-read, nothing grows with the log but the caches, which the
explainer bounds). So the live lines are the explainer's own verdicts on the log as it grows. A
line shows::

    10:15:02 line 4 atlas-openai chat/stream 200 | prompt 1,887 | reported cached 480 | predicted 480 | break
      at token 496 of 1,887, msg 0 (system), vs line 3: lost 1,280 tokens (40 blocks of 32), $0.0034 ...
      before '…type": "function", "function": {"name": "'
      now    'read'  (line 3 had 'search')
      after  '_file", "description": "Read a text file,…'
      hint   tools_reordered: '#0 search_code' -> '#0 read_file'; the same tools in another order; ...

``reported`` is what the upstream said (``cached_tokens``, ``cache_read_input_tokens``),
``predicted`` the explainer's count for a vLLM cache with this model, template and block size;
a disagreement is named with its likely cause. Dollars (``--provider``) are the break's cost
under that provider's rules, the same figure the explainer gives for that line afterwards; a
break that only the provider's own reading of the body shows (e.g. a tool list the local
template does not render) gets a line of its own, and so does a provider's own diagnosis of a
miss (OpenAI's ``prompt_cache_diagnostics``, Anthropic's ``cache_miss_reason``).

Fail open: a record the explainer cannot read (an HTTP error, a body vLLM refuses, a Responses
call chained to a response the log does not have) gets a line saying so, its reason spelled out the first
time; an error inside the analysis is reported once and the next record is analysed as usual. If
the renderer cannot load at all, the analysis stops and says why; recording goes on.

At the end (Ctrl-C) the worker prints the explainer's summary for what passed: tokens, hit rate,
breaks and what they lost by cause, agreement with the reported counts, the volatile spans, and
with ``--provider`` the cost table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError, first_line

POLL_S = 0.1  # how often the analysis looks for new lines in the log
NICE = 19  # where the idle scheduling class is missing: the lowest priority instead
DISCOVERY_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class LiveSettings:
    """What the analysis process needs (plain values: it is pickled to a spawned process)."""

    upstream: str
    model: str | None
    chat_template: str | None
    block_size: int | None
    scope: str
    providers: tuple[str, ...]
    prices: str | None
    context_tokens: int
    quiet: bool
    cache_tokens: int | None = None  # the cache model's bound (None: unbounded, its peak counted)
    session_window_s: float | None = 3600.0  # a session idle this long is closed, its state dropped


@dataclass(frozen=True)
class Discovered:
    """What a vLLM upstream says about itself on ``/metrics`` (open even with ``--api-key``)."""

    model: str | None  # the served model's name (its path, unless --served-model-name)
    block_size: int | None


def discover(upstream: str) -> Discovered | None:
    """Read a vLLM upstream's model and block size; None when it is not one (or not reachable)."""
    from harness.metrics import metric_label

    try:
        with urllib.request.urlopen(upstream + "/metrics", timeout=DISCOVERY_TIMEOUT_S) as response:
            text = response.read().decode("utf-8", errors="replace")
    except Exception:
        return None
    if "vllm:" not in text:
        return None
    block = metric_label(text, "vllm:cache_config_info", "block_size")
    model = None
    for metric in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total"):
        model = metric_label(text, metric, "model_name")
        if model:
            break
    return Discovered(model, int(block) if block and block.isdigit() else None)


# --------------------------------------------------------------------------- the proxy's side


class LiveAnalysis:
    """The analysis process seen from the proxy: ``start`` it on the log, ``finish`` at the end."""

    def __init__(self, settings: LiveSettings) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no aiohttp loop inside
        self._context = context
        self._stop: Any = context.Event()  # the proxy is done: read to the end of the log, then sum up
        self._done: Any = context.Value("l", 0, lock=False)  # records analysed (or passed over) so far
        self._process: Any = None
        self.settings = settings

    def start(self, log: Path, offset: int, first_line: int) -> None:
        """Read ``log`` from byte ``offset`` on, the record there being line ``first_line``."""
        args = (self.settings, str(log), offset, first_line, self._stop, self._done)
        self._process = self._context.Process(
            target=run_worker, args=args, name="proxy-analysis", daemon=True
        )
        self._process.start()

    @property
    def done(self) -> int:
        return int(self._done.value)

    def finish(self) -> None:
        """Let the worker read what the log holds, print the summary, and exit. A second Ctrl-C
        stops it at once (``KeyboardInterrupt`` reaches the caller after it is stopped)."""
        if self._process is None:
            return
        self._stop.set()
        try:
            self._process.join()
        except KeyboardInterrupt:
            self.terminate()
            raise

    def terminate(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


# --------------------------------------------------------------------------- the worker


def yield_the_cpu() -> None:
    """Run only when the CPU has nothing else to do (Linux ``SCHED_IDLE``, which any process may
    choose; elsewhere the lowest nice value): the analysis never takes a core from the proxy, the
    agent or a local engine. On a saturated machine it falls behind and catches up when idle."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(NICE)


def end_with_parent() -> None:
    """Linux: the kernel ends this process when the proxy's dies (even killed outright, even while
    vLLM is still loading here); ``Worker.run`` also checks, where this is not available."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the line above
        os._exit(0)


def run_worker(settings: LiveSettings, log: str, offset: int, first_line: int, stop: Any, done: Any) -> None:
    """The analysis process's main: Ctrl-C is the proxy's to handle (it then sets ``stop``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent()
    yield_the_cpu()
    Worker(settings).run(Path(log), offset, first_line, stop, done)


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _clip(text: str, width: int, keep: str) -> str:
    """``text`` quoted on one line, cut to ``width`` characters on the side away from the break."""
    if len(text) > width:
        text = "…" + text[-(width - 1) :] if keep == "end" else text[: width - 1] + "…"
    return repr(text)


@dataclass
class _Outcome:
    """What one record came to."""

    analysed: bool
    reason: str | None = None  # why not, when it was not


class Worker:
    """Reads records one by one into the explainer's ``LogRun`` and prints a line for each."""

    def __init__(self, settings: LiveSettings) -> None:
        from harness.console import new_console

        self.settings = settings
        self.console = new_console(off_terminal_width=200)
        self.run_: Any = None  # harness.explain.run.LogRun
        self.reader: Any = None  # harness.explain.formats.RecordReader
        self.model_name = ""
        self.block_size = 0
        self.not_analysed: Counter[str] = Counter()
        self.reasons_told: set[str] = set()
        self.errors_told: set[str] = set()

    # ------------------------------------------------------------------ setup

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def load(self) -> bool:
        """The renderer and the explainer; False (said once) when the analysis cannot run."""
        from harness.explain.cli import DEFAULT_BLOCK_SIZE
        from harness.model import resolve_model
        from harness.providers import load_table

        s = self.settings
        notes: list[str] = []
        found = discover(s.upstream)
        model = s.model
        if model is None and found is not None and found.model:
            if (Path(found.model) / "config.json").is_file():
                model = found.model
                notes.append("model read from the upstream's /metrics")
            else:
                notes.append(
                    f"the upstream serves {found.model}, not a local folder: pass --model to predict with it"
                )
        if found is None:
            notes.append(
                "the upstream is not a vLLM server (or hides /metrics): predicting what a vLLM cache "
                "would serve; a hosted API's own rendering and rules are approximated, its reported "
                "counts are the truth"
            )
        try:
            spec = resolve_model(model)
            self.block_size = s.block_size or (found.block_size if found else None) or DEFAULT_BLOCK_SIZE
            if s.block_size is None and found is not None and found.block_size:
                notes.append(f"block size {found.block_size} read from the upstream's /metrics")
            template = Path(s.chat_template) if s.chat_template else None
            self.model_name = spec.display_name + (f" + {template.name}" if template else "")
            # Always (a small file): a call answered by a hosted API is reconciled with its rules.
            table = load_table(Path(s.prices) if s.prices else None)
            self.say(f"analysis: loading vLLM's chat rendering for {self.model_name} (10-20 s) ...", "dim")
            # vLLM warns about its platform (Triton, model runner) before its logging is set up,
            # through Python's last-resort handler: a handler of its own keeps that off the console.
            logging.getLogger("vllm").addHandler(logging.NullHandler())
            from harness.explain import LogExplainer
            from harness.explain.costs import Pricer
            from harness.explain.formats import RecordReader
            from harness.explain.origin import Answered
            from harness.explain.render import ChatRenderer
            from harness.explain.run import LogRun

            renderer = ChatRenderer(spec.name_or_path, template)
            # A proxy runs for days: no token lists kept for a replay, sessions closed when idle,
            # earlier bodies kept for the providers' readings and the diagnoses' baselines.
            explainer = LogExplainer(
                renderer,
                self.block_size,
                s.context_tokens,
                s.scope,
                cache_tokens=s.cache_tokens,
                session_window=s.session_window_s,
                keep_tokens=False,
                keep_requests=True,
            )
            pricers = [Pricer(name, table, spec.display_name) for name in s.providers]
            self.run_ = LogRun(explainer, pricers, Answered(table), max_held=0)
            self.reader = RecordReader()
        except Exception as exc:  # UserError or anything vLLM raises: the proxy goes on recording
            self.say(f"analysis off: {first_line(exc)} (the proxy goes on recording)", "yellow")
            return False
        extra = f" ({'; '.join(notes)})" if notes else ""
        self.say(
            f"analysis ready: {self.model_name}, block size {self.block_size}, scope {s.scope}{extra}", "dim"
        )
        return True

    # ------------------------------------------------------------------ the loop

    def run(self, log: Path, offset: int, first_line: int, stop: Any, done: Any) -> None:
        """Follow the log from ``offset``: each whole line as soon as it is there, until ``stop``
        is set and the end is reached. The log is the queue: however far behind the analysis
        falls, the proxy holds nothing for it."""
        ready = self.load()
        parent = multiprocessing.parent_process()
        line = first_line
        pending = b""  # a line being written (the recorder writes whole lines; a read may split one)
        with log.open("rb") as handle:
            handle.seek(offset)
            while True:
                chunk = handle.readline()
                if chunk:
                    pending += chunk
                    if not pending.endswith(b"\n"):
                        continue
                    data, pending = pending, b""
                    if ready and data.strip():
                        self.one(line, data)
                    line += 1
                    done.value += 1
                    continue
                if stop.is_set():
                    break
                # A proxy killed outright never sets stop (and the kernel's signal is Linux only).
                if parent is not None and not parent.is_alive():
                    return
                time.sleep(POLL_S)
        if ready:
            self.summary()

    def one(self, line: int, data: bytes) -> None:
        try:
            record = json.loads(data)
        except ValueError:
            return
        outcome, result = self.analyse(line, data)
        if not outcome.analysed:
            self.not_analysed[outcome.reason or "unknown"] += 1
        if not self.settings.quiet:
            self.show(line, record, result, outcome)

    def analyse(self, line: int, data: bytes) -> tuple[_Outcome, Any]:
        from harness.explain.formats import NotServed

        try:
            request = self.reader.parse(data, line)
        except NotServed:
            return _Outcome(False, "not served"), None
        except UserError as exc:
            return _Outcome(False, _reason(str(exc))), None
        try:
            result = self.run_.add(request)
        except UserError as exc:
            return _Outcome(False, _reason(str(exc))), None
        except Exception as exc:  # fail open: said once, the next record is analysed as usual
            kind = type(exc).__name__
            if kind not in self.errors_told:
                self.errors_told.add(kind)
                self.say(
                    f"analysis error on line {line}: {kind}: {first_line(exc)} (reported once)", "yellow"
                )
            return _Outcome(False, f"analysis error ({kind})"), None
        return _Outcome(True), result

    # ------------------------------------------------------------------ the console

    def show(self, line: int, record: dict[str, Any], result: Any, outcome: _Outcome) -> None:
        from harness.explain.report import diagnosis_line, diagnosis_worth_showing

        api = str(record.get("url", "")).rstrip("/").rsplit("/", 1)[-1]
        api = {"completions": "chat"}.get(api, api)
        kind = f"{api}/stream" if record.get("stream") else api
        status = record.get("status")
        session = record.get("session_id") or "-"
        shown = status if status is not None else "-"
        head = f"{time.strftime('%H:%M:%S')} line {line} {session} {kind} {shown}"
        if record.get("incomplete"):
            head += " incomplete"
        reported = reported_usage(record)
        if result is None:
            prompt, cached = reported
            text = (
                f"{head} | prompt {_n(prompt)} | reported cached {_n(cached)}" if prompt is not None else head
            )
            why = outcome.reason or ""
            if why == "not served":  # the call's own error says why, every time
                why = str(record.get("error") or f"HTTP {status}: the server did not serve it")
            elif why in self.reasons_told and len(why) > 60:
                why = why[:57] + "... (as above)"
            self.reasons_told.add(outcome.reason or "")
            self.say(f"{text} | not analysed: {why}", "dim")
            return
        e = result.explanation
        r = e.reconciliation
        reported_cached = r.reported_cached_tokens if r is not None else reported[1]
        status_text = e.status
        if e.status == "cold" and e.cached_from_line is not None:
            status_text = f"cold (shared with line {e.cached_from_line})"
        style = {"break": "bold red", "extends": "green", "repeat": "green"}.get(e.status)
        self.say(
            f"{head} | prompt {e.prompt_tokens:,} | reported cached {_n(reported_cached)} | "
            f"predicted {e.predicted_cached_tokens:,} | {status_text}",
            style,
        )
        if r is not None and not r.agrees:
            self.say(f"  reported != predicted: {r.cause}: {r.detail}", "yellow")
        if e.is_break and e.divergence is not None:
            self.show_break(e, result.priced)
        self.show_provider_breaks(e, result.priced)
        d = result.diagnosis
        if d is not None and diagnosis_worth_showing(d):
            self.say("  " + diagnosis_line(d, with_line=False), "yellow" if d.agrees is False else None)

    def show_break(self, e: Any, priced: dict[str, Any]) -> None:
        d, b = e.divergence, self.block_size
        where = "the generation prompt" if e.message_index is None else f"msg {e.message_index} ({e.role})"
        money = _dollars(priced)
        self.say(
            f"  at token {e.first_divergence:,} of {e.prompt_tokens:,}, {where}, vs line {e.reference_line}: "
            f"lost {e.lost_tokens:,} tokens ({e.lost_tokens // b} blocks of {b}){money}"
        )
        self.say(f"  before {_clip(d.before, 60, 'end')}")
        had = _clip(d.previous_token, 30, "start")
        self.say(f"  now    {_clip(d.token, 30, 'start')}  (line {e.reference_line} had {had})")
        self.say(f"  after  {_clip(d.after, 60, 'start')}")
        if e.hint is not None:
            self.say(f"  hint   {e.hint.describe()}", "yellow")

    def show_provider_breaks(self, e: Any, priced: dict[str, Any]) -> None:
        """What a provider's own reading of the body finds and the local rendering does not (e.g.
        a tool list the local template does not render), or a loss with nothing changed."""
        from harness.explain.costs import UNKNOWN

        for name, p in priced.items():
            loss = p.loss
            if loss is None or loss.same_as_local:
                continue
            tilde = "~" if p.usage.approximate else ""
            if loss.change is not None:
                c = loss.change
                self.say(
                    f"  {name}: breaks in {c.where()} as it reads the body, vs line {c.reference_line}: "
                    f"{c.headline()}; lost {tilde}${loss.usd:,.4f}",
                    "yellow",
                )
                if c.hint is not None:
                    self.say(f"  hint   {c.hint.describe()}", "yellow")
            elif loss.cause == UNKNOWN:
                self.say(
                    f"  {name}: lost {tilde}${loss.usd:,.4f} with nothing changed in the bodies: the "
                    "provider's side (an eviction, the TTL, routing)",
                    "yellow",
                )

    # ------------------------------------------------------------------ the end

    def summary(self) -> None:
        from rich.text import Text

        from harness.explain.report import SCOPE_MEANING, cost_table, diagnoses_summary, spans_table

        finished = self.run_.finish()
        t = finished.totals
        not_analysed = sum(self.not_analysed.values())
        self.say("")
        self.say(
            f"summary of the live analysis ({self.model_name}, block size {self.block_size}, scope "
            f"{self.settings.scope}: {SCOPE_MEANING.get(self.settings.scope, '')})",
            "bold",
        )
        if not_analysed:
            reasons = sorted(self.not_analysed.items(), key=lambda kv: -kv[1])
            parts = ", ".join(f"{n} {why}" for why, n in reasons)
            self.say(f"  {t.requests} calls analysed, {not_analysed} not: {parts}")
        if not t.requests:
            return
        s = t.to_json()
        by_hint = ", ".join(f"{k} {v:,}" for k, v in s["lost_by_hint"].items())
        self.say(
            f"  {s['requests']} requests, {s['prompt_tokens']:,} prompt tokens, "
            f"{s['predicted_cached_tokens']:,} predicted cached ({s['hit_rate']:.1%}); "
            f"breaks: {s['breaks']}, lost {s['lost_tokens']:,} tokens" + (f" ({by_hint})" if by_hint else "")
        )
        if t.reported:
            self.say(
                f"  the reported cached tokens ({t.reported_cached_tokens:,}) agree with the prediction "
                f"on {t.reported_agree} of {t.reported} requests with usage",
                "green" if t.reported_agree == t.reported else "yellow",
            )
        if t.diagnoses:
            self.say("  " + diagnoses_summary(t), "yellow" if t.diagnoses_disagree else "green")
        if finished.spans:
            self.console.print(spans_table(finished.spans))
        if finished.costs:
            self.console.print(cost_table(finished.costs))
        self.console.print(Text(""))


def _dollars(priced: dict[str, Any]) -> str:
    """ ", $0.0034 openai:gpt-4.1, ~$0.0030 anthropic:..." for a break under each ``--provider``."""
    parts = []
    for name, p in priced.items():
        usage = p.usage
        if usage.cost_usd is None or usage.cost_if_extended_usd is None:
            parts.append(f"{name} no price (--prices)")
        else:
            lost = p.loss.usd if p.loss is not None else 0.0
            parts.append(f"{'~' if usage.approximate else ''}${lost:,.4f} {name}")
    return ", " + ", ".join(parts) if parts else ""


def _reason(message: str) -> str:
    """A not-analysed reason without its line prefix (the console line names the line)."""
    text = message.split(": ", 1)[1] if message.startswith("line ") and ": " in message else message
    return text


def reported_usage(record: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt tokens, cached tokens) as the upstream reported them, in any of the three APIs
    (read by the explainer's own response parser)."""
    from harness.explain.formats import parse_response

    parsed = parse_response(record.get("response"), "")
    if parsed is None or parsed.usage is None:
        return None, None
    return parsed.usage.prompt_tokens, parsed.usage.cached_tokens
