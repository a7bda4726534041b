"""Lesson 1: a timestamp at the top of the system prompt vs a stable prefix.

An agent sends its whole context every turn: a long system prompt (role, rules, tool schemas)
and the growing conversation. An engine with automatic prefix caching (vLLM's APC) keeps the
KV of every full block of tokens it has computed, keyed by a hash chain over all tokens before
it, and reuses it when a new prompt starts with the very same tokens.

WRONG: "Current date and time: 2026-11-27 09:30:05 UTC" as the first line of the system prompt.
The clock moves between turns, so the prompt differs from the previous turn a dozen tokens in,
inside the first block. Because the block hashes are chained, nothing after that token can be
reused either: every turn recomputes the entire prompt, thousands of tokens, from scratch.

RIGHT: the system prompt is byte-identical every turn. The time, when the agent needs it, goes
into the newest user message: the end of the prompt, where tokens are new anyway. Every turn
reuses all full blocks of the previous turn and computes only what was appended.

The conversation is a recorded agent trace and time comes from a simulated clock, so both
variants see the same words and every run renders the same tokens.

Run:
    python stable_prefix_vs_timestamp.py                 # 6 turns, embedded default model
    python stable_prefix_vs_timestamp.py --quick --json out.json
    python stable_prefix_vs_timestamp.py --endpoint http://127.0.0.1:8000   # your vLLM server
"""

from __future__ import annotations

import argparse

from harness.backend import Backend, Message
from harness.cli import exit_with, lesson_main
from harness.console import console
from harness.errors import UserError
from harness.measure import run_variants
from harness.report import ExampleResult, divergence_panel
from harness.scenario import (
    TASK,
    SimulatedClock,
    action_text,
    observation_text,
    system_prompt,
    trace,
)

EXAMPLE = "stable_prefix_vs_timestamp"
DEFAULT_TURNS = 6
QUICK_TURNS = 3


def build_wrong(turns: int, quick: bool = False) -> list[list[Message]]:
    """Each turn's request with the clock stamped at the top of the system prompt."""
    clock = SimulatedClock()
    steps = trace(turns - 1)
    requests = []
    for turn in range(turns):
        if turn:
            clock.advance(steps[turn - 1].seconds)
        system = f"Current date and time: {clock.stamp()}\n\n{system_prompt(quick)}"
        history: list[Message] = [{"role": "user", "content": TASK}]
        for step in steps[:turn]:
            history.append({"role": "assistant", "content": action_text(step)})
            history.append({"role": "user", "content": observation_text(step)})
        requests.append([{"role": "system", "content": system}, *history])
    return requests


def build_right(turns: int, quick: bool = False) -> list[list[Message]]:
    """The same turns with a byte-stable system prompt; the time rides on the newest message."""
    clock = SimulatedClock()
    steps = trace(turns - 1)
    messages: list[Message] = [
        {"role": "system", "content": system_prompt(quick)},
        {"role": "user", "content": f"[{clock.stamp()}] {TASK}"},
    ]
    requests = [list(messages)]
    for step in steps:
        clock.advance(step.seconds)
        # Append only: earlier messages, with the times they were sent at, never change.
        messages.append({"role": "assistant", "content": action_text(step)})
        messages.append({"role": "user", "content": f"[{clock.stamp()}] {observation_text(step)}"})
        requests.append(list(messages))
    return requests


def add_lesson_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--turns",
        type=int,
        default=None,
        help=f"agent turns per variant (default {DEFAULT_TURNS}, {QUICK_TURNS} with --quick)",
    )


def turns_from(args: argparse.Namespace) -> int:
    turns = int(args.turns if args.turns is not None else (QUICK_TURNS if args.quick else DEFAULT_TURNS))
    if turns < 2:
        raise UserError(f"--turns must be at least 2 (a cache can only help from the second), got {turns}")
    return turns


def run(backend: Backend, args: argparse.Namespace) -> ExampleResult:
    turns = turns_from(args)
    wrong, right = run_variants(
        backend,
        [
            (
                "wrong",
                "timestamp (to the second) at the top of the system prompt",
                build_wrong(turns, args.quick),
            ),
            (
                "right",
                "byte-stable system prompt; the time goes in the newest user message",
                build_right(turns, args.quick),
            ),
        ],
        args.max_tokens,
    )
    return ExampleResult(
        EXAMPLE,
        backend.info,
        [wrong, right],
        notes=[f"{turns} turns per variant; each variant starts from an empty cache, WRONG first"],
    )


def show_details(result: ExampleResult) -> None:
    """Where each variant's second turn left the cache, token-exactly."""
    for name in ("wrong", "right"):
        record = result.variant(name).requests[1]
        console.print(divergence_panel(record, f"{name.upper()} turn 1: where the prompt left the cache"))


def main(argv: list[str] | None = None) -> int:
    # turns_from checks the flags first: bad input fails before the engine starts.
    return lesson_main(
        argv, __doc__, add_args=add_lesson_args, check_args=turns_from, run=run, show_details=show_details
    )


if __name__ == "__main__":
    exit_with(main)
