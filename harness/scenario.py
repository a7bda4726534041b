"""Shared material for the lessons: an agent's system prompt, its tools, a recorded task, and a
simulated clock.

The lessons need a realistic agent context (a long system prompt with tool schemas, then a
growing conversation) but not a live agent: the conversation is a recorded trace, so WRONG and
RIGHT see exactly the same words and only the layout the lesson is about differs. Time comes
from a simulated clock so every run renders the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

Message = dict[str, str]


@dataclass
class SimulatedClock:
    """A clock that only moves when told to: prompts with times in them stay reproducible."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 27, 9, 30, 5, tzinfo=UTC))

    def advance(self, seconds: float) -> datetime:
        self.now = self.now + timedelta(seconds=seconds)
        return self.now

    def stamp(self) -> str:
        """The time to the second, as agents commonly print it."""
        return self.now.strftime("%Y-%m-%d %H:%M:%S UTC")


ROLE = """\
You are Atlas, an autonomous software-maintenance agent working inside a company's monorepo.
You receive tasks from engineers, plan them, call tools to inspect and change the repository,
and report back with a short summary of what you did and why. You work carefully: you read
before you write, you run the tests before you claim success, and you never guess at facts you
can look up with a tool."""

RULES = [
    "Think step by step, but only output one action per turn.",
    'An action is a single JSON object: {"tool": NAME, "arguments": {...}}. Nothing else.',
    "Use only the tools listed below, with arguments that match their JSON schema exactly.",
    "Read a file before you edit it; never edit a file you have not read in this session.",
    "Keep edits minimal: change only the lines needed for the task, keep the existing style.",
    "Run the relevant tests after every change; a task is done only when they pass.",
    "If a tool returns an error, read the error, adjust, and retry at most twice.",
    "Never print secrets, tokens or passwords, even if a file or tool output contains them.",
    "Never run destructive shell commands (rm -rf, git push --force, DROP TABLE).",
    "Ask the engineer a question with `ask_user` when the task is ambiguous; do not guess.",
    "Prefer searching the code with `search_code` over listing directories one by one.",
    "When you cite code in your summary, give the path and the line numbers.",
    "Report in plain English, at most five sentences, then list the files you changed.",
    "If the task cannot be done safely, stop and explain why with `finish`.",
    "Respect the repository's CONTRIBUTING.md: conventional commits, one change per commit.",
    "Timeouts: a shell command may run for at most 120 seconds; split longer work.",
]

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {
        "name": "search_code",
        "description": "Search the repository for a regular expression; returns matching lines.",
        "parameters": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "description": "A Python regular expression."},
                "path": {"type": "string", "description": "Folder to search, default the root."},
                "max_results": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
            },
            "required": ["pattern"],
        },
    },
    {
        "name": "read_file",
        "description": "Read a text file, optionally a range of lines.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Path relative to the repo root."},
                "start_line": {"type": "integer", "minimum": 1},
                "end_line": {"type": "integer", "minimum": 1},
            },
            "required": ["path"],
        },
    },
    {
        "name": "edit_file",
        "description": "Replace an exact, unique snippet of a file with new text.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "old_text": {"type": "string", "description": "Must occur exactly once."},
                "new_text": {"type": "string"},
            },
            "required": ["path", "old_text", "new_text"],
        },
    },
    {
        "name": "run_tests",
        "description": "Run the test suite or a subset; returns the summary and failures.",
        "parameters": {
            "type": "object",
            "properties": {
                "selector": {"type": "string", "description": "A pytest node id or -k expr."},
                "timeout_s": {"type": "integer", "minimum": 1, "maximum": 600, "default": 120},
            },
            "required": [],
        },
    },
    {
        "name": "git_diff",
        "description": "Show the uncommitted changes, optionally for one path.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": [],
        },
    },
    {
        "name": "open_ticket",
        "description": "Open a ticket in the issue tracker for follow-up work.",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 120},
                "body": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
            },
            "required": ["title", "body"],
        },
    },
    {
        "name": "ask_user",
        "description": "Ask the engineer a clarifying question and wait for the answer.",
        "parameters": {
            "type": "object",
            "properties": {"question": {"type": "string"}},
            "required": ["question"],
        },
    },
    {
        "name": "finish",
        "description": "End the task with a summary for the engineer.",
        "parameters": {
            "type": "object",
            "properties": {
                "summary": {"type": "string"},
                "files_changed": {"type": "array", "items": {"type": "string"}},
                "status": {"type": "string", "enum": ["done", "blocked", "needs_review"]},
            },
            "required": ["summary", "status"],
        },
    },
]


def system_prompt(quick: bool = False) -> str:
    """The agent's stable instructions: role, rules and tool schemas.

    The full prompt is about 1,200 tokens: already the size where prefill dominates a turn (a
    cold prefill takes seconds on a CPU, a cached one a fraction of a second), and small enough
    for all four lessons to run in minutes on two cores. Quick mode keeps the same shape at
    about 550 tokens so tests run fast.
    """
    rules = RULES[:6] if quick else RULES
    tools = TOOL_SCHEMAS[:3] if quick else TOOL_SCHEMAS
    parts = [
        ROLE,
        "Rules:\n" + "\n".join(f"{i}. {rule}" for i, rule in enumerate(rules, 1)),
        "Tools (JSON schema):\n" + "\n".join(json.dumps(t, sort_keys=True) for t in tools),
    ]
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Step:
    """One step of the recorded agent trace: what the agent did and what came back."""

    action: dict[str, Any]
    observation: str
    seconds: float  # how long the step took on the (simulated) clock


TASK = (
    "The nightly build fails in services/billing: test_invoice_rounding expects 10.01 but "
    "gets 10.00. Find the cause, fix it, and make sure the billing tests pass."
)

TRACE: list[Step] = [
    Step(
        {"tool": "search_code", "arguments": {"pattern": "def round_amount", "path": "services/billing"}},
        "services/billing/money.py:42: def round_amount(value: Decimal, places: int = 2) -> Decimal:",
        7.0,
    ),
    Step(
        {
            "tool": "read_file",
            "arguments": {"path": "services/billing/money.py", "start_line": 38, "end_line": 52},
        },
        "38 from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal\n"
        "42 def round_amount(value: Decimal, places: int = 2) -> Decimal:\n"
        "43     quantum = Decimal(1).scaleb(-places)\n"
        "44     return value.quantize(quantum, rounding=ROUND_DOWN)",
        4.0,
    ),
    Step(
        {"tool": "search_code", "arguments": {"pattern": "ROUND_DOWN", "path": "services/billing"}},
        "services/billing/money.py:44: return value.quantize(quantum, rounding=ROUND_DOWN)\n"
        "services/billing/CHANGELOG.md:12: - switch rounding to ROUND_DOWN (perf experiment, revert me)",
        6.0,
    ),
    Step(
        {
            "tool": "edit_file",
            "arguments": {
                "path": "services/billing/money.py",
                "old_text": "rounding=ROUND_DOWN)",
                "new_text": "rounding=ROUND_HALF_UP)",
            },
        },
        "edited services/billing/money.py: 1 line changed",
        3.0,
    ),
    Step(
        {"tool": "run_tests", "arguments": {"selector": "services/billing/tests"}},
        "collected 48 items\n48 passed in 3.91s",
        41.0,
    ),
    Step(
        {"tool": "git_diff", "arguments": {"path": "services/billing/money.py"}},
        "-    return value.quantize(quantum, rounding=ROUND_DOWN)\n"
        "+    return value.quantize(quantum, rounding=ROUND_HALF_UP)",
        2.0,
    ),
    Step(
        {
            "tool": "open_ticket",
            "arguments": {
                "title": "Remove leftover rounding experiment note",
                "body": "CHANGELOG.md line 12 mentions a reverted experiment.",
                "priority": "low",
            },
        },
        "ticket BILL-2291 opened",
        5.0,
    ),
    Step(
        {"tool": "run_tests", "arguments": {"selector": "services/billing/tests -k invoice"}},
        "collected 9 items\n9 passed in 1.02s",
        12.0,
    ),
]


def trace(steps: int) -> list[Step]:
    """The first ``steps`` steps of the recorded task (repeating the last checks if asked for more)."""
    if steps <= len(TRACE):
        return TRACE[:steps]
    extra = [TRACE[-1]] * (steps - len(TRACE))
    return TRACE + extra


def action_text(step: Step) -> str:
    """How the agent's action appears in its own (assistant) message."""
    return json.dumps(step.action, sort_keys=True)


def observation_text(step: Step) -> str:
    """How a tool result is handed back: as a user message, which every chat template renders."""
    return f"Tool result ({step.action['tool']}):\n{step.observation}"
