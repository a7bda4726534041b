"""The flags that bound the explainer's state, shared by ``harness.explain`` and ``harness.proxy``."""

from __future__ import annotations

import argparse

from harness.explain.analyze import DEFAULT_SESSION_WINDOW_REQUESTS, DEFAULT_SESSION_WINDOW_S


def token_count(text: str) -> int:
    """A positive number of tokens: 2000000, 2M, 500k."""
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(float(digits) * scale)
    except ValueError:
        example = "(e.g. 2000000, 2M, 500k)"
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r} {example}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {text!r}")
    return value


def duration(text: str) -> float | None:
    """Seconds from 90, 90s, 30m, 2h; None for none/off."""
    if text.lower() in ("none", "off", "never"):
        return None
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower(), 1)
    digits = text[:-1] if text[-1:].lower() in "smh" else text
    try:
        value = float(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 2h, 3600, none)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return value


def add_state_args(parser: argparse.ArgumentParser) -> None:
    """``--cache-tokens`` and ``--session-window``: what the analysis keeps, however long the log."""
    parser.add_argument(
        "--cache-tokens",
        type=token_count,
        default=None,
        metavar="N",
        help="the cache holds at most N tokens (e.g. 2M: what the engine's KV cache holds), least "
        "recently used blocks evicted as vLLM does; default unbounded (its peak is reported)",
    )
    parser.add_argument(
        "--session-window",
        type=duration,
        default=DEFAULT_SESSION_WINDOW_S,
        metavar="T",
        help="close a session idle longer than T (e.g. 30m, 2h, 3600, none; default 1h; "
        f"{DEFAULT_SESSION_WINDOW_REQUESTS:,} requests for a log without timestamps): its state is "
        "dropped, a request after that starts it anew",
    )
