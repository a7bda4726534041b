"""The command line of ``python -m harness.proxy``.

Bad input (a flag, an upstream that is not an http(s) URL, a log that cannot be written or
already exists without ``--append``, a port in use, an unknown ``--provider``) is one line,
``error: ...``, and exit 2, before anything listens or any file is created. Ctrl-C (or SIGTERM)
stops it: calls in flight are cancelled and recorded as incomplete, the records are all written,
the live analysis finishes what it was given and prints its summary, then the log's path. A
second Ctrl-C skips the rest of the analysis. Exit status 0 after a stop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from harness.errors import UserError
from harness.explain.flags import add_state_args
from harness.proxy.forward import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, Proxy, ProxySettings
from harness.proxy.live import LiveAnalysis, LiveSettings
from harness.proxy.record import LogFile, Recorder, check_log_target
from harness.proxy.sessions import DEFAULT_HEADER, SessionResolver

DEFAULT_PORT = 8800
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SWITCH_INTERVAL_S = 0.0005


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    from harness.explain.analyze import DEFAULT_CONTEXT_TOKENS, SCOPES, SHARED

    parser = _Parser(
        prog="python -m harness.proxy",
        description="A recording reverse proxy for an agent's LLM calls: forwards everything unchanged, "
        "logs each Chat Completions, Responses and Messages call in the explainer's format, and says "
        "live, per call, what the prefix cache served and why it missed.",
    )
    parser.add_argument(
        "--upstream",
        required=True,
        metavar="URL",
        help="where the calls go: a vLLM server, a hosted OpenAI- or Anthropic-compatible API or a "
        "gateway, as its root URL (http://127.0.0.1:8000, https://api.openai.com; a /v1 at the end is "
        "the clients' part of the path and is dropped)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default {DEFAULT_PORT}; 0: any free one)",
    )
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help="the log to write (default: proxy-YYYYMMDD-HHMMSS.jsonl here); created readable by you only",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to an existing --log instead of refusing it (the proxy never overwrites a log)",
    )
    parser.add_argument(
        "--session-header",
        default=DEFAULT_HEADER,
        metavar="NAME",
        help=f"the request header naming a call's session (default {DEFAULT_HEADER}; without it the body's "
        "prompt_cache_key, metadata.user_id, user, ... are used: see harness/proxy/sessions.py)",
    )
    parser.add_argument(
        "--add-stream-usage",
        action="store_true",
        help="ask for usage on streamed Chat Completions calls that do not "
        "(stream_options.include_usage): the log then has the cached tokens; the client gets one more chunk",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT_S,
        metavar="S",
        help=f"longest wait for the upstream's answer, and longest silence inside a stream, before 504 / "
        f"a cut (default {DEFAULT_READ_TIMEOUT_S:g} s)",
    )
    a = parser.add_argument_group("live analysis (the explainer's: python -m harness.explain --help)")
    a.add_argument(
        "--model",
        default=None,
        help="model whose tokenizer and chat template render the prompts (default: the upstream's, when it "
        "is a vLLM server with a local model folder; else $KVCACHE_LESSONS_MODEL or the prepared "
        "SmolLM2-135M-Instruct)",
    )
    a.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="the chat template your server runs with",
    )
    a.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV cache block size (default: the upstream's /metrics when it is vLLM, else 32)",
    )
    a.add_argument(
        "--scope", choices=SCOPES, default=SHARED, help="shared (default) or session: see the explainer"
    )
    a.add_argument(
        "--provider",
        action="append",
        default=[],
        metavar="NAME",
        help="also price each break under a provider's rules: vllm, sglang, openai:MODEL, anthropic:MODEL, "
        "gemini:MODEL, or all (see docs/providers.md)",
    )
    a.add_argument("--prices", type=Path, default=None, metavar="FILE", help="prices overriding the table's")
    a.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help=f"tokens of text shown each side of a break (default {DEFAULT_CONTEXT_TOKENS})",
    )
    add_state_args(a)
    a.add_argument("--quiet", action="store_true", help="no line per call; the summary at the end only")
    a.add_argument(
        "--record-only",
        action="store_true",
        help="no live analysis at all: forward and log (vLLM is not loaded)",
    )
    return parser


def default_log_name() -> Path:
    return Path(time.strftime("proxy-%Y%m%d-%H%M%S.jsonl"))


def check_args(args: argparse.Namespace) -> tuple[ProxySettings, LiveSettings | None, Path]:
    """Every check that can fail, before anything listens or is written."""
    from harness.explain.costs import resolve
    from harness.monitor.poll import normalize_url

    upstream = normalize_url(args.upstream)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, got {args.port}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if not args.session_header.strip() or any(c in args.session_header for c in " :\r\n"):
        raise UserError(f"--session-header {args.session_header!r} is not a header name")
    log = args.log if args.log is not None else default_log_name()
    check_log_target(log, args.append)
    settings = ProxySettings(
        upstream=upstream,
        host=args.host,
        port=args.port,
        session_header=args.session_header.strip(),
        add_stream_usage=args.add_stream_usage,
        connect_timeout_s=min(DEFAULT_CONNECT_TIMEOUT_S, args.timeout),
        read_timeout_s=args.timeout,
    )
    if args.record_only:
        return settings, None, log
    if args.block_size is not None and args.block_size <= 0:
        raise UserError(f"--block-size must be a positive number of tokens, got {args.block_size}")
    if args.context < 0:
        raise UserError(f"--context must not be negative, got {args.context}")
    if args.chat_template is not None and not args.chat_template.is_file():
        raise UserError(f"--chat-template {args.chat_template}: no such file")
    model = None
    if args.model is not None:
        from harness.model import resolve_model

        model = resolve_model(args.model).name_or_path
    providers: list[str] = []
    if args.provider or args.prices is not None:
        from harness.providers import load_table

        providers = resolve(args.provider, load_table(args.prices))  # an unknown one fails here
    live = LiveSettings(
        upstream=upstream,
        model=model,
        chat_template=str(args.chat_template.resolve()) if args.chat_template else None,
        block_size=args.block_size,
        scope=args.scope,
        providers=tuple(providers),
        prices=str(args.prices.resolve()) if args.prices else None,
        context_tokens=args.context,
        quiet=args.quiet,
        cache_tokens=args.cache_tokens,
        session_window_s=args.session_window,
    )
    return settings, live, log


def warn(message: str) -> None:
    from harness.console import err_console

    err_console.print(f"[yellow]warning:[/] {message}", soft_wrap=True, highlight=False)


async def serve(settings: ProxySettings, log_path: Path, live: LiveAnalysis | None) -> tuple[Proxy, Recorder]:
    """Listen until SIGINT or SIGTERM; then stop, with every record written."""
    from harness.console import console

    holder: list[Recorder] = []
    proxy = Proxy(settings, lambda call: holder[0].submit(call))
    await proxy.start()
    # No await between binding and here: no request can arrive before the recorder exists.
    log = LogFile(log_path)
    recorder = Recorder(log, SessionResolver(settings.session_header), warn)
    holder.append(recorder)
    if live is not None:  # a spawned process reading the log: vLLM loads there, never here
        live.start(log_path, log.start_offset, log.start_lines + 1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    state = "new" if log.created else f"appending after its {log.lines} lines"
    console.print(
        f"harness.proxy: {proxy.url} -> {proxy.upstream_name}\n"
        f"  log       {log_path} ({state}; mode {log.mode:o})\n"
        f"  agents    OPENAI_BASE_URL={proxy.url}/v1   ANTHROPIC_BASE_URL={proxy.url}\n"
        f"  Ctrl-C stops it: a summary of what passed, and where the log is",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if log.mode & 0o077:
        warn(f"{log_path} is readable by others (mode {log.mode:o}) and will hold prompts: chmod 600 it")
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await proxy.stop()
    return proxy, recorder


def run(args: argparse.Namespace) -> int:
    from harness.console import console

    settings, live_settings, log_path = check_args(args)
    if settings.host not in LOCAL_HOSTS:
        warn(
            f"listening on {settings.host}: anyone who can reach this machine can send calls through the "
            "proxy (to the upstream, with its own credentials or none) and into your log"
        )
    live = LiveAnalysis(live_settings) if live_settings is not None else None
    # The recorder thread shares the GIL with the event loop: a waiting loop gets it back within
    # 0.5 ms instead of Python's default 5 ms, which would show in a stream's p99.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Everything imported so far lives as long as the process: out of the collector's sight, a
    # full collection no longer walks it (it stalled the event loop 34 ms under 64 streams).
    gc.freeze()
    runner = _event_loop()
    try:
        proxy, recorder = runner.run(serve(settings, log_path, live))
    finally:
        runner.close()
    recorder.close()
    if live is not None:
        behind = recorder.recorded - live.done
        if behind > 0:
            console.print(
                f"finishing the live analysis of {behind} more calls (Ctrl-C again to skip it) ...",
                markup=False,
                highlight=False,
            )
        try:
            live.finish()
        except KeyboardInterrupt:
            console.print("live analysis skipped", markup=False)
    parts = [f"{recorder.recorded} calls recorded"]
    if recorder.incomplete:
        parts.append(f"{recorder.incomplete} incomplete")
    if recorder.lost:
        parts.append(f"{recorder.lost} lost (the log could not be written)")
    parts.append(f"{proxy.passed} other requests forwarded")
    console.print(
        f"log: {log_path.resolve()} ({', '.join(parts)})", markup=False, highlight=False, soft_wrap=True
    )
    if recorder.recorded:
        again = ["python -m harness.explain", str(log_path)]
        if live_settings is not None and live_settings.chat_template:
            again += ["--chat-template", str(args.chat_template)]
        console.print(f"explain it again: {' '.join(again)}", markup=False, highlight=False, soft_wrap=True)
    return 0


def _event_loop() -> asyncio.Runner:
    """uvloop when it is there (lower latency per request), asyncio's own loop otherwise."""
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        return asyncio.Runner()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. User errors print one line (``error: ...``) and return their exit code."""
    from harness.cli import run_cli

    def start(raw: list[str] | None) -> int:
        args = build_parser().parse_args(raw)
        return run(args)

    return run_cli(start, list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
