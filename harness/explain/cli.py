"""The command line of ``python -m harness.explain``.

Bad input (a malformed line, a missing file, an output that cannot be written, an unreachable
server, a block size that is not a positive number) is reported as one line, ``error: ...``,
with exit status 2, before vLLM is imported; ``--verify`` exits 1 when the engine disagrees.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.explain.analyze import (
    DEFAULT_CONTEXT_TOKENS,
    SCOPES,
    SHARED,
    RequestExplanation,
    explain_requests,
)
from harness.explain.costs import ENGINES, expand, price_log, usd_by_line
from harness.explain.formats import ChatRequest, read_requests
from harness.explain.report import (
    check_json_target,
    disagreements,
    print_report,
    print_suggestion,
    report_json,
    write_json,
)
from harness.explain.spans import find_spans, suggest
from harness.providers import load_table

DEFAULT_BLOCK_SIZE = 32  # the CPU engine's block size in this project (harness.engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.explain",
        description="Say, token-exactly, where each request of an agent's request log leaves the "
        "KV prefix cache, what text sits there, and what that costs after block rounding.",
    )
    parser.add_argument(
        "requests",
        type=Path,
        help="JSONL file, one request per line in the order sent: an OpenAI Chat Completions, "
        "OpenAI Responses or Anthropic Messages body, bare or with its response "
        '({"request": ..., "response": ...}, batch files, gateway logs); see harness/explain/formats.py',
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model whose tokenizer and chat template render the prompts: a local folder or hub "
        "id (default: $KVCACHE_LESSONS_MODEL, else the prepared SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="the chat template your server runs with (vLLM's --chat-template), instead of the model's",
    )
    parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render a body's own chat_template (vLLM refuses them unless started with this flag)",
    )
    parser.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action="store_true",
        help="drop tools from requests with tool_choice none, as a vLLM server with this flag does",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"KV cache block size in tokens (default {DEFAULT_BLOCK_SIZE}, this project's CPU engine; "
        "vLLM's CUDA default is 16); with --endpoint, the server's own value",
    )
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default=SHARED,
        help="shared (default): one engine, sessions share blocks (one vLLM server without "
        "cache_salt); session: each session its own cache (a cache_salt per session)",
    )
    parser.add_argument(
        "--session-field",
        default="session_id",
        metavar="NAME",
        help="the field naming a request's session, in the record, the body or its metadata "
        "(default session_id)",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help=f"tokens of text to show on each side of a break (default {DEFAULT_CONTEXT_TOKENS})",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="F",
        help="also write the result as JSON to F (never overwrites a file that is not an earlier "
        "result of this tool)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed lines with a warning instead of stopping at the first one",
    )
    parser.add_argument(
        "--provider",
        action="append",
        default=[],
        metavar="NAME",
        help="also price the log under a provider's caching rules: vllm, sglang, openai:MODEL, "
        "anthropic:MODEL, gemini:MODEL, or all (repeat or separate with commas; see docs/providers.md)",
    )
    parser.add_argument(
        "--prices",
        type=Path,
        default=None,
        metavar="FILE",
        help="rules and prices overriding or extending harness/data/providers.json (same shape), "
        "e.g. a price for vllm:* or sglang:*",
    )
    parser.add_argument(
        "--suggest",
        action="store_true",
        help="apply the top volatile span's fix to its session and show one real request before and "
        "after, with where the cache breakpoint goes",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also replay the log on the embedded vLLM engine and show its cached tokens next to the "
        "prediction; exit 1 if any differ",
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        metavar="URL",
        help="replay the log on your running vLLM server instead (started with --enable-prefix-caching "
        "--enable-prompt-tokens-details); it renders the bodies itself",
    )
    return parser


@contextlib.contextmanager
def _progress(console: Any, total: int, label: str) -> Iterator[Callable[[object], None]]:
    """A bar on stderr while ``total`` items go by; yields the function that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda _item: bar.advance(task)


def run(args: argparse.Namespace) -> int:
    from harness.console import err_console as err
    from harness.model import resolve_model

    if args.block_size is not None and args.block_size <= 0:
        raise UserError(f"--block-size must be a positive number of tokens, got {args.block_size}")
    if args.context < 0:
        raise UserError(f"--context must not be negative, got {args.context}")
    if args.chat_template is not None and not args.chat_template.is_file():
        raise UserError(f"--chat-template {args.chat_template}: no such file")
    if args.json is not None:
        check_json_target(args.json)  # fail before the work, not after it
    providers = expand(args.provider)
    table = None
    if providers or args.prices is not None:
        table = load_table(args.prices)
        for name in providers:
            if name not in ENGINES:
                table.entry(name)  # an unknown provider or model fails here, before anything slow

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    requests, skipped = read_requests(
        args.requests, skip_bad=args.skip_bad, warn=warn, session_field=args.session_field
    )
    if not requests:
        raise UserError(f"no requests in {args.requests}")
    spec = resolve_model(args.model)

    server = None
    block_size = args.block_size or DEFAULT_BLOCK_SIZE
    if args.endpoint:
        from harness.backend import ServerBackend

        with err.status(f"connecting to {args.endpoint} ..."):
            server = ServerBackend(args.endpoint, None, args.block_size)
        if args.block_size is not None and args.block_size != server.block_size:
            warn(f"the server uses block size {server.block_size}, not {args.block_size}")
        block_size = server.block_size
    options = None
    if args.verify and server is None:
        from harness.engine import EngineOptions, apply_environment

        options = EngineOptions(model=spec.name_or_path, block_size=block_size)
        apply_environment(options)  # before vLLM is first imported (by the renderer)

    from harness.explain.render import ChatRenderer

    with err.status(f"loading vLLM's chat rendering for {spec.display_name} (10-20 s) ..."):
        renderer = ChatRenderer(
            spec.name_or_path,
            args.chat_template,
            trust_request_chat_template=args.trust_request_chat_template,
            exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        )
    with _progress(err, len(requests), "rendering and looking up") as advance:
        explanations = explain_requests(
            requests, renderer, block_size, args.context, scope=args.scope, on_request=advance
        )

    verified = None
    if args.verify or server is not None:
        from harness.explain.verify import EngineReplay, ServerReplay, verify

        too_long = [e.line for e in explanations if e.longer_than_context]
        if too_long and server is None:
            raise UserError(
                f"lines {too_long} are longer than the model's context of {renderer.max_model_len} "
                "tokens: the engine would refuse them (drop them, or pass a longer-context --model)"
            )
        backend = None
        if server is not None:
            replay: object = ServerReplay(server.base, server.model, server.block_size, renderer)
        else:
            from harness.backend import OfflineBackend

            assert options is not None
            with err.status(f"starting vLLM on {spec.display_name} (block size {block_size}) ..."):
                backend = OfflineBackend(options, spec.display_name)
            if backend.info.block_size != block_size:
                backend.close()
                raise UserError(
                    f"the engine runs with block size {backend.info.block_size}, not {block_size}"
                )
            replay = EngineReplay(backend)
        try:
            with _progress(err, len(requests), "replaying on the engine") as advance:
                verified = verify(requests, explanations, replay, args.scope, on_request=advance)  # type: ignore[arg-type]
        finally:
            if backend is not None:
                backend.close()

    costs = (
        price_log(providers, requests, explanations, table, spec.display_name) if table and providers else []
    )
    spans = find_spans(explanations, renderer.decode, usd_by_line(costs, explanations))
    suggestion = None
    if args.suggest and spans:

        def reanalyze(fixed: list[ChatRequest]) -> list[RequestExplanation]:
            return explain_requests(fixed, renderer, block_size, args.context, scope=args.scope)

        suggestion = suggest(requests, explanations, spans[0], reanalyze, block_size)
    template = str(args.chat_template) if args.chat_template is not None else None
    model_name = spec.display_name + (f" + {args.chat_template.name}" if args.chat_template else "")
    print_report(explanations, model_name, block_size, verified, scope=args.scope, costs=costs, spans=spans)
    if suggestion is not None:
        print_suggestion(suggestion)
    elif args.suggest:
        print("no volatile span: every request extends (or repeats) its session's previous one")
    if args.json is not None:
        document = report_json(
            args.requests,
            spec.display_name,
            block_size,
            explanations,
            skipped,
            verified,
            scope=args.scope,
            requests=requests,
            chat_template=template,
            costs=costs,
            spans=spans,
            suggestion=suggestion,
        )
        write_json(args.json, document)
    if verified is not None:
        return 1 if disagreements(explanations, verified) else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. User errors print one line (``error: ...``) and return their exit code."""
    from harness.cli import run_cli

    return run_cli(
        lambda args: run(build_parser().parse_args(args)), list(argv) if argv is not None else None
    )
