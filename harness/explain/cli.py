"""The command line of ``python -m harness.explain``.

Bad input (a malformed line, a missing file, an output that cannot be written, an unreachable
server, a block size that is not a positive number) is reported as one line, ``error: ...``,
with exit status 2, before vLLM is imported; ``--verify`` exits 1 when the engine disagrees.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.api_key import API_KEY_FLAG, add_api_key_arg, api_key_from
from harness.errors import UserError
from harness.explain.analyze import (
    DEFAULT_CONTEXT_TOKENS,
    SCOPES,
    SHARED,
    LogExplainer,
    RequestExplanation,
    explain_requests,
)
from harness.explain.costs import Pricer, resolve
from harness.explain.diagnostics import diagnosed
from harness.explain.flags import add_state_args
from harness.explain.formats import ChatRequest, SkippedLine, iter_requests
from harness.explain.origin import Answered
from harness.explain.profile import Profile, print_profile
from harness.explain.report import (
    check_json_target,
    check_jsonl_target,
    print_cache_use,
    print_report,
    print_suggestion,
)
from harness.explain.run import DEFAULT_MAX_HELD, Finished, JsonOutput, LogRun, ending, header
from harness.explain.spans import Suggestion, VolatileSpan, suggest
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
        help="also price the log under a provider's caching rules: a provider (openai, anthropic, deepseek, "
        "...: its default model), provider:MODEL, vllm, sglang, or all (repeat or separate with commas; "
        "providers, models and defaults: docs/providers.md)",
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
        "--jsonl",
        type=Path,
        default=None,
        metavar="F",
        help="also write one JSON line per request to F as it is explained (a header line first, a "
        "summary line last): for logs too big for one JSON document",
    )
    add_state_args(parser)
    parser.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="K/N",
        help="with --scope session: explain only the sessions of shard K of N (by a hash of the "
        "session id); N processes with --shard 1/N ... N/N cover the log",
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_HELD,
        metavar="N",
        help=f"show the rows and details of the first N requests (default {DEFAULT_MAX_HELD:,}); totals, "
        "--json and --jsonl cover every request",
    )
    parser.add_argument(
        "--tokenize",
        choices=("pieces", "whole"),
        default="pieces",
        help="pieces (default): tokenize only the parts of a prompt not seen lately (split at the "
        "template's special tokens; the same tokens, checked); whole: every prompt whole, as the server does",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print where the time went: start-up, reading, rendering, tokenizing, the cache model, ...",
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
    add_api_key_arg(parser, "the --endpoint server")
    return parser


def _shard(text: str) -> tuple[int, int]:
    k, slash, n = text.partition("/")
    try:
        shard = (int(k), int(n))
    except ValueError:
        shard = (0, 0)
    if not slash or not 1 <= shard[0] <= shard[1]:
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, e.g. 1/2; got {text!r}")
    return shard


def in_shard(request: ChatRequest, shard: tuple[int, int] | None) -> bool:
    """Whether ``request``'s session belongs to shard K of N (a stable hash of its id)."""
    if shard is None:
        return True
    k, n = shard
    return zlib.crc32((request.session_id or "").encode("utf-8")) % n == k - 1


@contextlib.contextmanager
def _progress(console: Any, total: int, label: str) -> Iterator[Callable[[object], None]]:
    """A bar on stderr while ``total`` items go by; yields the function that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda _item: bar.advance(task)


def _check(args: argparse.Namespace) -> None:
    """Everything about the flags that can be wrong, before anything is read."""
    if args.block_size is not None and args.block_size <= 0:
        raise UserError(f"--block-size must be a positive number of tokens, got {args.block_size}")
    if args.context < 0:
        raise UserError(f"--context must not be negative, got {args.context}")
    if args.max_rows < 0:
        raise UserError(f"--max-rows must not be negative, got {args.max_rows}")
    if args.chat_template is not None and not args.chat_template.is_file():
        raise UserError(f"--chat-template {args.chat_template}: no such file")
    if args.shard is not None and args.scope != "session":
        raise UserError(
            "--shard needs --scope session: under --scope shared every session can reuse every other's "
            "blocks, so sessions cannot be explained apart"
        )
    if args.json is not None:
        check_json_target(args.json)  # fail before the work, not after it
    if args.jsonl is not None:
        check_jsonl_target(args.jsonl)
    if args.api_key is not None and not args.endpoint:
        raise UserError(f"{API_KEY_FLAG} goes with --endpoint: the embedded engine takes no key")
    if args.json is not None and args.jsonl is not None and args.json.resolve() == args.jsonl.resolve():
        raise UserError("--json and --jsonl name the same file")


@dataclass(frozen=True)
class Scan:
    """What the check of every line found."""

    requests: int
    skipped: list[SkippedLine]
    diagnosed: int  # requests carrying a provider's own diagnosis (they need earlier bodies)


def _scan(args: argparse.Namespace, warn: Callable[[str], None]) -> Scan:
    """Every line checked before anything slow starts."""
    count, diagnosed_count, skipped = 0, 0, []
    field = args.session_field
    for item in iter_requests(args.requests, skip_bad=args.skip_bad, warn=warn, session_field=field):
        if isinstance(item, SkippedLine):
            skipped.append(item)
        elif in_shard(item, args.shard):
            count += 1
            diagnosed_count += diagnosed(item) is not None
    return Scan(count, skipped, diagnosed_count)


def run(args: argparse.Namespace) -> int:
    from harness.console import err_console as err
    from harness.model import resolve_model

    profile = Profile(enabled=args.profile)
    _check(args)
    api_key = api_key_from(args.api_key)
    # Always loaded (a small JSON file): a log recorded from a hosted API is held to its rules.
    table = load_table(args.prices)
    providers = resolve(args.provider, table)

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    with profile.stage("read and parse"):
        scan = _scan(args, warn)
    total, skipped = scan.requests, scan.skipped
    if not total:
        where = f" for --shard {args.shard[0]}/{args.shard[1]}" if args.shard else ""
        raise UserError(f"no requests in {args.requests}{where}")
    spec = resolve_model(args.model)

    server = None
    block_size = args.block_size or DEFAULT_BLOCK_SIZE
    if args.endpoint:
        from harness.backend import ServerBackend

        with err.status(f"connecting to {args.endpoint} ..."):
            server = ServerBackend(args.endpoint, None, args.block_size, api_key)
        if args.block_size is not None and args.block_size != server.block_size:
            warn(f"the server uses block size {server.block_size}, not {args.block_size}")
        block_size = server.block_size
    options = None
    if args.verify and server is None:
        from harness.engine import EngineOptions, apply_environment

        options = EngineOptions(model=spec.name_or_path, block_size=block_size)
        apply_environment(options)  # before vLLM is first imported (by the renderer)

    with profile.stage("start-up"):
        from harness.explain.render import ChatRenderer

        with err.status(f"loading vLLM's chat rendering for {spec.display_name} (10-20 s) ..."):
            renderer = ChatRenderer(
                spec.name_or_path,
                args.chat_template,
                trust_request_chat_template=args.trust_request_chat_template,
                exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                pieces=args.tokenize == "pieces",
            )
    replaying = args.verify or server is not None
    backend = None
    verifier = None
    if replaying:
        from harness.explain.verify import EngineReplay, ServerReplay, Verifier

        if server is not None:
            replay: object = ServerReplay(
                server.base, server.model, server.block_size, server.api_key, renderer
            )
        else:
            from harness.backend import OfflineBackend

            assert options is not None
            with (
                profile.stage("start-up"),
                err.status(f"starting vLLM on {spec.display_name} (block size {block_size}) ..."),
            ):
                backend = OfflineBackend(options, spec.display_name)
            if backend.info.block_size != block_size:
                backend.close()
                runs = backend.info.block_size
                raise UserError(f"the engine runs with block size {runs}, not {block_size}")
            replay = EngineReplay(backend)
        verifier = Verifier(replay, args.scope)  # type: ignore[arg-type]

    explainer = LogExplainer(
        renderer,
        block_size,
        args.context,
        scope=args.scope,
        cache_tokens=args.cache_tokens,
        session_window=args.session_window,
        keep_tokens=replaying,
        # Earlier bodies serve the providers' readings and the diagnoses' baselines only.
        keep_requests=bool(providers) or scan.diagnosed > 0,
        profile=profile,
    )
    log_run = LogRun(
        explainer,
        [Pricer(name, table, spec.display_name) for name in providers],
        Answered(table),
        verifier,
        max_held=args.max_rows,
        profile=profile,
    )
    template = str(args.chat_template) if args.chat_template is not None else None
    head = header(args.requests, spec.display_name, template, block_size, args.scope, replaying)
    targets = ((args.json, False), (args.jsonl, True))
    outputs = [JsonOutput(path, lines, head) for path, lines in targets if path is not None]
    try:
        try:
            with _progress(err, total, "rendering and looking up") as advance:
                items = iter_requests(args.requests, skip_bad=True, session_field=args.session_field)
                while True:
                    with profile.stage("read and parse"):
                        item = next(items, None)
                    if item is None:
                        break
                    if isinstance(item, SkippedLine) or not in_shard(item, args.shard):
                        continue
                    result = log_run.add(item)
                    if verifier is not None and server is None and result.explanation.longer_than_context:
                        raise UserError(
                            f"line {item.line} is longer than the model's context of "
                            f"{renderer.max_model_len} tokens: the engine would refuse it (drop it, or "
                            "pass a longer-context --model)"
                        )
                    with profile.stage("output"):
                        if outputs:
                            row = result.row()
                            for output in outputs:
                                output.row(row)
                    advance(result)
        finally:
            if backend is not None:
                backend.close()
        finished = log_run.finish()
        suggestion = None
        if args.suggest and finished.local_spans:
            suggestion = _suggestion(args, renderer, block_size, finished.local_spans[0], log_run)
        with profile.stage("output"):
            _print(args, spec, block_size, log_run, finished, suggestion, explainer)
        if args.profile:
            from harness.console import new_console

            print_profile(profile, finished.totals.prompt_tokens, new_console(off_terminal_width=140))
        end = ending(skipped, finished, suggestion.to_json() if suggestion is not None else None)
        more = {"cache_use": explainer.cache_use().to_json(), "profile_s": profile.to_json()}
        for output in outputs:
            output.close({**end, **more} if output.lines else end)
    except BaseException:
        for output in outputs:
            output.abandon()
        raise
    if replaying:
        return 1 if finished.totals.engine_disagrees else 0
    return 0


def _suggestion(
    args: argparse.Namespace, renderer: Any, block_size: int, top: VolatileSpan, log_run: LogRun
) -> Suggestion:
    """The top span's fix on its session: the session's requests read again (a second pass over the
    log, keeping that session only), the fix applied, the analysis run again."""

    def reanalyze(fixed: list[ChatRequest]) -> list[RequestExplanation]:
        return explain_requests(fixed, renderer, block_size, args.context, scope=args.scope)

    session = [
        item
        for item in iter_requests(args.requests, skip_bad=True, session_field=args.session_field)
        if isinstance(item, ChatRequest) and item.session_id == top.session_id
    ]
    # The fix is checked by analysing again on the local rendering: a span it shows.
    return suggest(session, log_run.held.breaks, top, reanalyze, block_size)


def _print(
    args: argparse.Namespace,
    spec: Any,
    block_size: int,
    log_run: LogRun,
    finished: Finished,
    suggestion: Suggestion | None,
    explainer: LogExplainer,
) -> None:
    held = log_run.held
    model_name = spec.display_name + (f" + {args.chat_template.name}" if args.chat_template else "")
    print_report(
        held.explanations,
        model_name,
        block_size,
        held.verified,
        scope=args.scope,
        costs=finished.costs,
        spans=finished.spans,
        diagnoses=held.diagnoses,
        origins=held.origins,
        totals=finished.totals,
        beyond=held.beyond,
    )
    print_cache_use(explainer.cache_use(), args.profile)
    if suggestion is not None:
        print_suggestion(suggestion)
    elif args.suggest and finished.spans:
        top = finished.spans[0]  # only a provider's reading has it: the local analysis cannot check its fix
        print(
            f"no volatile span in the local rendering to fix and check again; the top one is {top.kind} in "
            f"{top.piece}, as {top.provider} reads the body: {top.fix}"
        )
    elif args.suggest:
        print("no volatile span: every request extends (or repeats) its session's previous one")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. User errors print one line (``error: ...``) and return their exit code."""
    from harness.cli import run_cli

    return run_cli(
        lambda args: run(build_parser().parse_args(args)), list(argv) if argv is not None else None
    )
