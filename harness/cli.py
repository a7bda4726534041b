"""The flags every lesson shares, opening the backend they ask for, and clean failure."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

from rich.markup import escape

from harness import in_project_venv
from harness.api_key import API_KEY_FLAG, add_api_key_arg, api_key_from
from harness.backend import Backend, OfflineBackend, ServerBackend
from harness.console import console, err_console
from harness.engine import EngineOptions, detect_device
from harness.errors import UserError, missing_module_is_ours, setup_first
from harness.model import MODEL_ENV, resolve_model
from harness.report import DEFAULT_PRICE_AS, ExampleResult, check_json_target, show, write_json


def add_common_args(parser: argparse.ArgumentParser, json_schema: str = "lesson") -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        help=f"Hugging Face model id or local folder (default: ${MODEL_ENV}, else the embedded "
        "SmolLM2-135M-Instruct prepared by setup_and_test.py)",
    )
    g.add_argument(
        "--endpoint",
        help="URL of a running OpenAI-compatible vLLM server (started with --enable-prefix-caching "
        "--enable-prompt-tokens-details) to use instead of the embedded engine",
    )
    add_api_key_arg(g, "the --endpoint server (lesson 4: the --endpoints servers)")
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the embedded engine runs (default: cuda if available, else cpu)",
    )
    g.add_argument("--dtype", help="model dtype (default: float32 on CPU, vLLM's choice on CUDA)")
    g.add_argument(
        "--block-size",
        type=int,
        help="KV-cache block size in tokens (default: 32 on CPU, 16 on CUDA; CPU needs a "
        "multiple of 32). With --endpoint: only if the server's /metrics does not say",
    )
    g.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip torch.compile/CUDA graphs (default: on for CPU, vLLM's choice on CUDA)",
    )
    g.add_argument(
        "--kv-cache-gib", type=float, help="CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE; default 2)"
    )
    g.add_argument(
        "--threads", type=int, help="CPU threads for the engine (OMP_NUM_THREADS; default: all usable cores)"
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.85,
        help="fraction of GPU memory vLLM may use on CUDA (default 0.85)",
    )
    g.add_argument(
        "--max-model-len", type=int, help="context length the engine is built for (default: the model's)"
    )
    o = parser.add_argument_group("output")
    o.add_argument(
        "--json",
        metavar="PATH",
        help=f"also write the results as JSON (docs/schemas/{json_schema}.schema.json)",
    )
    o.add_argument(
        "--quick",
        action="store_true",
        help="short prompts and few requests: a fast smoke run (what the tests use)",
    )
    o.add_argument(
        "--price-as",
        default=DEFAULT_PRICE_AS,
        metavar="PROVIDER:MODEL",
        help=f"price the prompt tokens at this provider's list prices in the summary (default "
        f"{DEFAULT_PRICE_AS}; see docs/providers.md)",
    )
    o.add_argument(
        "--max-tokens",
        type=int,
        default=1,
        help="tokens to generate per request; TTFT needs only the first (default 1)",
    )


def lesson_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description, and the shared flags."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    return parser


def lesson_main(
    argv: list[str] | None,
    doc: str,
    *,
    add_args: Callable[[argparse.ArgumentParser], None],
    check_args: Callable[[argparse.Namespace], object],
    run: Callable[[Backend | None, argparse.Namespace], ExampleResult],
    show_details: Callable[[ExampleResult], None],
    table_columns: Sequence[str] = (),
    shared_engine: bool = True,
) -> int:
    """The ``main`` of a lesson: parse, fail on bad input before anything slow starts (the
    lesson's own checks, the ``--json`` target, the engine's options), run, then the tables, the
    lesson's own details and ``--json``.

    ``shared_engine=False``: the lesson starts its own engines (lesson 4's workers) and ``run``
    gets no backend.
    """
    parser = lesson_parser(doc)
    add_args(parser)
    args = parser.parse_args(argv)
    check_args(args)
    args.price_as = check_price_as(args.price_as)
    json_path = check_json_target(args.json)
    if not shared_engine:
        result = run(None, args)
    else:
        with backend_from_args(args) as backend:
            result = run(backend, args)
    result.price_as = args.price_as
    show(result, extra_columns=tuple(table_columns))
    show_details(result)
    write_json(json_path, result.to_json())
    return 0


def check_price_as(provider_model: str) -> str:
    """``--price-as`` names a provider:model the price table knows (one line and exit 2 if not);
    returns it as ``provider:model`` (a provider alone is its default model)."""
    from harness.providers import load_table

    return load_table().entry(provider_model).key


def engine_options(args: argparse.Namespace, enable_prefix_caching: bool = True) -> EngineOptions:
    spec = resolve_model(args.model)
    if args.block_size is not None and args.block_size <= 0:
        raise UserError(f"--block-size must be positive, got {args.block_size}")
    device = args.device if args.device != "auto" else detect_device()
    if args.device == "cuda" and detect_device() != "cuda":
        raise UserError("--device cuda: no CUDA GPU is usable here (torch sees none); leave --device at auto")
    if device == "cpu" and args.block_size is not None and args.block_size % 32:
        raise UserError(f"--block-size {args.block_size}: the CPU engine needs a multiple of 32")
    return EngineOptions(
        model=spec.name_or_path,
        device=device,
        dtype=args.dtype,
        block_size=args.block_size,
        enforce_eager=args.enforce_eager,
        kv_cache_gib=args.kv_cache_gib,
        threads=args.threads,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        enable_prefix_caching=enable_prefix_caching,
    )


def open_backend(args: argparse.Namespace) -> Backend:
    """The embedded engine, or the server named by ``--endpoint``, with a progress display."""
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.endpoint:
        key = api_key_from(args.api_key)
        with console.status(f"connecting to {args.endpoint} ..."):
            return ServerBackend(args.endpoint, args.model, args.block_size, key)
    if args.api_key is not None:
        raise UserError(f"{API_KEY_FLAG} goes with --endpoint: the embedded engine takes no key")
    opts = engine_options(args)
    name = resolve_model(args.model).display_name
    with console.status(f"starting vLLM on {opts.resolved_device()} with {name} (about 30-90 s on CPU) ..."):
        return OfflineBackend(opts, name)


@contextlib.contextmanager
def backend_from_args(args: argparse.Namespace) -> Iterator[Backend]:
    backend = open_backend(args)
    try:
        yield backend
    finally:
        backend.close()


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's ``main``: bad input becomes one line on stderr and a non-zero exit."""
    try:
        return main(argv)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # a package imported on the way (e.g. matplotlib for a plot)
        if missing_module_is_ours(exc):
            raise
        message = setup_first(exc, in_project_venv())
        err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


def exit_with(main: Callable[[list[str] | None], int]) -> None:
    sys.exit(run_cli(main))
