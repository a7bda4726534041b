"""Lesson 2: agent state edited in place vs an append-only event log.

An agent working through a task list keeps its working state in the context: which tasks are
done, which one is in progress, how far it got. An engine with automatic prefix caching (vLLM's
APC) reuses the KV of a new prompt up to the first token that differs from what it computed
before, in whole blocks, because block hashes are chained. Everything after that token is
computed again.

WRONG: the state is one JSON document right after the system prompt, edited in place every step
(a task's status flips, the step counter and `updated_at` move, a task record is rebuilt so its
keys come out in another order) and re-serialized with a plain `json.dumps`. The first edit sits
a few tokens into the state, so every step recomputes the whole task list and the entire
conversation after it; only the system prompt's blocks survive.

RIGHT: the state is an append-only event log. The plan is logged once, where WRONG keeps its
state; each step's events (task done, next task started) go at the end of that step's tool
result, the newest message, where tokens are new anyway. Events are serialized
deterministically (sorted keys, fixed separators, ASCII only, floats rounded to fixed places),
so rendering the context again from the same events gives byte-identical text and every step's
prompt extends the previous one. Replaying the log yields exactly the state WRONG carries.

The quieter trap, shown on its own with the tokenizer alone: the same data serialized with its
keys in another order is other text, so other tokens, so a cache miss from the first moved key
on, though nothing changed.

The conversation is a recorded agent trace and time comes from a simulated clock, so both
variants see the same facts and every run renders the same tokens.

Run:
    python append_only_vs_inplace_edit.py                  # 6 steps, embedded default model
    python append_only_vs_inplace_edit.py --quick --json out.json
    python append_only_vs_inplace_edit.py --endpoint http://127.0.0.1:8000   # your vLLM server
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from harness.backend import Backend, Message
from harness.cli import exit_with, lesson_main
from harness.console import Table, console, escape
from harness.errors import UserError
from harness.explain import detect_hint
from harness.explain.render import ChatRenderer
from harness.measure import VariantResult, run_variants
from harness.model import resolve_model
from harness.prefix import cached_tokens_for, common_prefix_len
from harness.report import ExampleResult, divergence_panel
from harness.scenario import TASK, TRACE, SimulatedClock, Step, action_text, observation_text, system_prompt

EXAMPLE = "append_only_vs_inplace_edit"
DEFAULT_STEPS = 6
QUICK_STEPS = 3
MAX_STEPS = len(TRACE) + 1  # the first request, then one per recorded tool step

State = dict[str, Any]
Event = dict[str, Any]

GOAL = "Fix test_invoice_rounding in services/billing and leave the billing tests green."

# The agent's plan for the recorded task: step i of the trace finishes task i.
PLAN: list[tuple[str, str, list[str], float]] = [  # title, tool, depends_on, estimated seconds
    ("Find where invoice amounts are rounded", "search_code", [], 30.0),
    ("Read the rounding helper in money.py", "read_file", ["T01"], 20.0),
    ("Find out why ROUND_DOWN was introduced", "search_code", ["T02"], 45.0),
    ("Switch round_amount back to ROUND_HALF_UP", "edit_file", ["T03"], 15.0),
    ("Run the billing test suite", "run_tests", ["T04"], 60.0),
    ("Review the diff before reporting", "git_diff", ["T05"], 10.0),
    ("Ticket the stale CHANGELOG note", "open_ticket", ["T03"], 20.0),
    ("Re-run the invoice tests", "run_tests", ["T05"], 12.5),
    ("Check other callers of round_amount for double rounding", "search_code", ["T04"], 40.0),
    ("Confirm the nightly job needs no config change", "read_file", ["T08"], 20.0),
    ("Note the fix in services/billing/CHANGELOG.md", "edit_file", ["T07"], 15.0),
    ("Report to the engineer with the files changed", "finish", ["T08", "T10"], 10.0),
]
QUICK_TASKS = len(TRACE)  # quick mode plans only the tasks the trace can finish

STATE_HEADER = "Agent state (JSON, kept up to date by the agent every step):\n"
LOG_HEADER = "Agent state log (JSON Lines, append-only; replay in order to get the state):\n"
EVENTS_HEADER = "\n\nState events:\n"


def iso(clock: SimulatedClock) -> str:
    return clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(quick: bool, now: str) -> list[State]:
    """The task list both variants start from, every task pending."""
    entries = PLAN[:QUICK_TASKS] if quick else PLAN
    return [
        {
            "id": f"T{i:02d}",
            "title": title,
            "tool": tool,
            "status": "pending",
            "attempts": 0,
            "depends_on": list(depends_on),
            "est_s": est_s,
            "updated_at": now,
            "result": None,
        }
        for i, (title, tool, depends_on, est_s) in enumerate(entries, 1)
    ]


def result_of(step: Step) -> str:
    """What a finished task records: the first line of its tool's answer."""
    return step.observation.splitlines()[0][:60]


def context(state_text: str, steps: list[tuple[str, str]], quick: bool) -> list[Message]:
    """One request, in the layout both variants share: the system prompt, the state message, the
    task, then an (action, tool result) pair per step done."""
    messages: list[Message] = [
        {"role": "system", "content": system_prompt(quick)},
        {"role": "system", "content": state_text},
        {"role": "user", "content": TASK},
    ]
    for action, result in steps:
        messages.append({"role": "assistant", "content": action})
        messages.append({"role": "user", "content": result})
    return messages


# --------------------------------------------------------------------------- WRONG


def rebuilt(record: State, **changes: Any) -> State:
    """A common way agent code updates a record: a new dict, the changed fields first, then the rest.

    The data comes out right; the key order does not stay put: the changed keys move to the front.
    """
    return {**changes, **{key: value for key, value in record.items() if key not in changes}}


def initial_state(quick: bool, now: str) -> State:
    state: State = {"goal": GOAL, "step": 0, "updated_at": now, "elapsed_s": 0.0, "tasks": plan(quick, now)}
    state["tasks"][0] = rebuilt(state["tasks"][0], status="in_progress", updated_at=now)
    return state


def edit_in_place(state: State, index: int, step: Step, now: str) -> None:
    """Step ``index`` is done: finish its task, start the next, move the counters."""
    state["step"] += 1
    state["updated_at"] = now
    state["elapsed_s"] += step.seconds
    tasks = state["tasks"]
    done = tasks[index]
    tasks[index] = rebuilt(
        done, status="done", attempts=done["attempts"] + 1, updated_at=now, result=result_of(step)
    )
    if index + 1 < len(tasks):
        tasks[index + 1] = rebuilt(tasks[index + 1], status="in_progress", updated_at=now)


def build_wrong(steps: int, quick: bool = False) -> list[list[Message]]:
    """Each step's request with the state JSON edited in place and re-serialized near the top."""
    clock = SimulatedClock()
    state = initial_state(quick, iso(clock))
    done: list[tuple[str, str]] = []
    requests = [context(STATE_HEADER + json.dumps(state), done, quick)]
    for index, step in enumerate(TRACE[: steps - 1]):
        clock.advance(step.seconds)
        edit_in_place(state, index, step, iso(clock))
        done.append((action_text(step), observation_text(step)))
        requests.append(context(STATE_HEADER + json.dumps(state), done, quick))
    return requests


# --------------------------------------------------------------------------- RIGHT

FLOAT_PLACES = 3


def _fixed_floats(value: Any) -> Any:
    # Floats computed two ways (0.1 + 0.2 vs 0.3) print differently; rounding fixes one text.
    if isinstance(value, float):
        return round(value, FLOAT_PLACES)
    if isinstance(value, dict):
        return {key: _fixed_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_fixed_floats(item) for item in value]
    return value


def canonical_json(value: Any) -> str:
    """One text per value, whatever order its dicts were built in: equal data, equal tokens."""
    return json.dumps(
        _fixed_floats(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def log_lines(events: list[Event]) -> str:
    return "\n".join(canonical_json(event) for event in events)


def plan_events(quick: bool, now: str) -> list[Event]:
    return [
        {"seq": 1, "at": now, "type": "plan", "goal": GOAL, "tasks": plan(quick, now)},
        {"seq": 2, "at": now, "type": "task_started", "task": "T01"},
    ]


def step_events(seq: int, index: int, step: Step, now: str, tasks: int) -> list[Event]:
    """What step ``index`` appends: its task is done and, if there is one, the next one starts."""
    events: list[Event] = [
        {
            "seq": seq,
            "at": now,
            "type": "task_done",
            "task": f"T{index + 1:02d}",
            "result": result_of(step),
            "duration_s": step.seconds,
        }
    ]
    if index + 1 < tasks:
        events.append({"seq": seq + 1, "at": now, "type": "task_started", "task": f"T{index + 2:02d}"})
    return events


def render_right(log: list[list[Event]], quick: bool) -> list[Message]:
    """The whole request rendered again from the events, as an agent framework does every step.

    ``log[0]`` is the plan, ``log[i]`` the events of step ``i``. Nothing here remembers text from
    the previous step: byte-identical earlier text comes from deterministic serialization alone.
    """
    steps = [
        (action_text(step), observation_text(step) + EVENTS_HEADER + log_lines(events))
        for step, events in zip(TRACE, log[1:], strict=False)
    ]
    return context(LOG_HEADER + log_lines(log[0]), steps, quick)


def build_right(steps: int, quick: bool = False) -> list[list[Message]]:
    """The same steps with an append-only log: each step's events ride on its tool result."""
    clock = SimulatedClock()
    log = [plan_events(quick, iso(clock))]
    tasks = len(log[0][0]["tasks"])
    requests = [render_right(log, quick)]
    for index, step in enumerate(TRACE[: steps - 1]):
        clock.advance(step.seconds)
        seq = log[-1][-1]["seq"] + 1
        log.append(step_events(seq, index, step, iso(clock), tasks))
        requests.append(render_right(log, quick))
    return requests


def replay(events: list[Event]) -> State:
    """Fold the log into a state: the very dict WRONG edits in place (key order aside)."""
    state: State = {}
    for event in events:
        if event["type"] == "plan":
            state = {
                "goal": event["goal"],
                "step": 0,
                "elapsed_s": 0.0,
                "tasks": copy.deepcopy(event["tasks"]),
            }
        else:
            task = next(t for t in state["tasks"] if t["id"] == event["task"])
            task["updated_at"] = event["at"]
            if event["type"] == "task_started":
                task["status"] = "in_progress"
            elif event["type"] == "task_done":
                task.update(status="done", attempts=task["attempts"] + 1, result=event["result"])
                state["step"] += 1
                state["elapsed_s"] += event["duration_s"]
        state["updated_at"] = event["at"]
    return state


# --------------------------------------------------------------------------- the quieter trap


@dataclass(frozen=True)
class KeyOrderTrap:
    """The same state serialized twice, its keys in two orders, as the next request would send it."""

    moved: str  # which record was rebuilt
    data_equal: bool  # the two states compare equal as data
    hint: str | None  # what the explainer calls the change, given the two documents
    canonical_text_equal: bool  # canonical_json gives both the same text
    prompt_tokens: int
    first_difference: int  # token index where the two json.dumps prompts part
    window: list[tuple[int, str, str]]  # (index, token before the edit, token after it)
    cached_same_text: int  # the next request's cached tokens had the text not changed
    cached_keys_moved: int  # ... with the keys moved (plain json.dumps)
    canonical_prompt_tokens: int
    cached_canonical: int  # ... with canonical_json on both sides

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EditResult(ExampleResult):
    """The shared result plus the key-order trap, typed until the JSON."""

    key_order_trap: KeyOrderTrap = field(kw_only=True)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "key_order_trap": self.key_order_trap.to_json()}


def key_order_trap(
    renderer: ChatRenderer, block_size: int, quick: bool, context_tokens: int = 3
) -> KeyOrderTrap:
    """A no-op edit (a pending task set to pending) rebuilds its record: equal data, other text."""
    state = initial_state(quick, iso(SimulatedClock()))
    moved = copy.deepcopy(state)
    moved["tasks"][1] = rebuilt(moved["tasks"][1], status=moved["tasks"][1]["status"])

    def prompt(text: str) -> list[int]:
        return renderer.render_messages(context(STATE_HEADER + text, [], quick)).token_ids

    before, after = prompt(json.dumps(state)), prompt(json.dumps(moved))
    canonical_before, canonical_after = prompt(canonical_json(state)), prompt(canonical_json(moved))
    index = common_prefix_len(before, after)
    hint = detect_hint(json.dumps(state), json.dumps(moved))  # the explainer, on the whole documents
    window = [
        (i, renderer.decode(before[i : i + 1]), renderer.decode(after[i : i + 1]))
        for i in range(max(0, index - context_tokens), min(len(after), index + context_tokens + 1))
    ]
    return KeyOrderTrap(
        moved="tasks[1] (T02)",
        data_equal=moved == state,  # dicts compare without regard to key order
        hint=hint.kind if hint is not None else None,
        canonical_text_equal=canonical_before == canonical_after,
        prompt_tokens=len(after),
        first_difference=index,
        window=window,
        cached_same_text=cached_tokens_for(len(before), len(before), block_size),
        cached_keys_moved=cached_tokens_for(len(after), index, block_size),
        canonical_prompt_tokens=len(canonical_after),
        cached_canonical=cached_tokens_for(
            len(canonical_after), common_prefix_len(canonical_before, canonical_after), block_size
        ),
    )


# --------------------------------------------------------------------------- running it


def add_lesson_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"agent steps (requests) per variant, 2 to {MAX_STEPS} "
        f"(default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)",
    )


def steps_from(args: argparse.Namespace) -> int:
    default = QUICK_STEPS if args.quick else DEFAULT_STEPS
    steps = int(args.steps if args.steps is not None else default)  # 0 is a bad value, not "unset"
    if not 2 <= steps <= MAX_STEPS:
        raise UserError(
            f"--steps must be between 2 and {MAX_STEPS} (the first request, then one per recorded "
            f"tool step), got {steps}"
        )
    return steps


@lru_cache(maxsize=2)
def template_renderer(model: str | None) -> ChatRenderer:
    # The explainer's renderer (vLLM's own chat rendering): it also says which message holds a
    # token, which is how each break is placed in the layout below.
    return ChatRenderer(resolve_model(model).name_or_path)


def context_part(message_index: int | None, state: str) -> str:
    """Name the part of the shared layout (see ``context``) a message index points at."""
    if message_index is None:
        return "generation prompt"
    if message_index < 3:
        return ("system prompt", state, "task")[message_index]
    step, kind = divmod(message_index - 3, 2)
    return f"step {step + 1} {('action', 'tool result')[kind]}"


def annotate(
    variant: VariantResult, requests: list[list[Message]], renderer: ChatRenderer, state: str
) -> None:
    """Add to each record where its first uncached token sits: message, role, part, and why."""
    for record, messages, previous in zip(variant.requests, requests, [None, *requests], strict=False):
        if previous is None:
            continue  # the first request of a variant meets an empty cache
        index = renderer.message_at(renderer.render_messages(messages), record.first_divergence)
        hint = None
        if index is not None and index < len(previous) and previous[index]["role"] == messages[index]["role"]:
            found = detect_hint(previous[index]["content"], messages[index]["content"])
            hint = found.kind if found is not None else None
        record.extra.update(
            {
                "message_index": index,
                "role": messages[index]["role"] if index is not None else None,
                "context_part": context_part(index, state),
                "hint": hint,
            }
        )


def run(backend: Backend, args: argparse.Namespace) -> EditResult:
    steps = steps_from(args)
    renderer = template_renderer(args.model)
    wrong_requests, right_requests = build_wrong(steps, args.quick), build_right(steps, args.quick)
    if renderer.render_messages(wrong_requests[0]).token_ids != backend.render(wrong_requests[0]):
        raise UserError(
            "the local tokenizer renders these prompts differently from the engine: "
            "pass --model naming the model the server runs"
        )
    wrong, right = run_variants(
        backend,
        [
            ("wrong", "state JSON right after the system prompt, edited in place every step", wrong_requests),
            ("right", "append-only event log, canonical JSON; each step's events at the end", right_requests),
        ],
        args.max_tokens,
    )
    annotate(wrong, wrong_requests, renderer, "state JSON")
    annotate(right, right_requests, renderer, "state log")
    return EditResult(
        EXAMPLE,
        backend.info,
        [wrong, right],
        notes=[f"{steps} steps per variant; each variant starts from an empty cache, WRONG first"],
        key_order_trap=key_order_trap(renderer, backend.info.block_size, args.quick),
    )


# --------------------------------------------------------------------------- showing it


def _around(before: str, token: str, after: str) -> str:
    """The text at a divergence, the first new token highlighted; newlines shown as ⏎."""
    before, token, after = (text.replace("\n", "⏎") for text in (before, token, after))
    return f"[dim]…{escape(before[-14:])}[/][bold red on white]{escape(token)}[/][dim]{escape(after[:6])}…[/]"


def steps_table(variant: VariantResult) -> Table:
    records = variant.requests[1:]  # the first request of a variant meets an empty cache
    title = f"{variant.name.upper()}: where each step's prompt left the cache"
    table = Table(title=title, title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("token", justify="right")
    table.add_column("in message")
    table.add_column("text there")
    hints = any(r.extra.get("hint") for r in records)
    if hints:
        table.add_column("hint")
    table.add_column("cached / predicted", justify="right")  # the engine's count, then ours
    table.add_column("TTFT ms", justify="right")
    for r in records:
        d = r.divergence
        message = r.extra.get("message_index")
        where = r.extra.get("context_part", "")
        row = [
            str(r.index),
            str(r.first_divergence),
            where if message is None else f"{message} {r.extra['role']}: {where}",
            _around(d.before, d.token, d.after) if d is not None else "",
        ]
        row += [r.extra.get("hint") or ""] if hints else []
        row += [f"{r.cached_tokens:,} / {r.predicted_cached_tokens:,}", f"{r.ttft_ms:,.0f}"]
        table.add_row(*row)
    return table


def trap_table(trap: KeyOrderTrap) -> Table:
    table = Table(title="The quieter trap: equal data, keys in another order", title_justify="left")
    table.add_column("token", justify="right")
    table.add_column("json.dumps(state)")
    table.add_column(f"json.dumps(state), {trap.moved} rebuilt")
    for index, old, new in trap.window:
        style = "bold red" if index == trap.first_difference else ""
        table.add_row(str(index), repr(old), repr(new), style=style)
    return table


def show_details(result: ExampleResult) -> None:
    """Per step, where each variant left the cache; then the key-order trap on its own."""
    if not isinstance(result, EditResult):
        raise TypeError(f"lesson 2 shows its own results, got {type(result).__name__}")
    for name in ("wrong", "right"):
        console.print(steps_table(result.variant(name)))
    wrong_step = result.variant("wrong").requests[1]
    console.print(divergence_panel(wrong_step, "WRONG step 1: where the prompt left the cache"))

    trap = result.key_order_trap
    console.print(trap_table(trap))
    lost = trap.cached_same_text - trap.cached_keys_moved
    console.print(
        f"A no-op edit (T02's status set to what it was) rebuilt the record: equal as data "
        f"(==): {trap.data_equal}; the explainer's hint: {trap.hint}.\n"
        f"Cached tokens the next request would get (prediction, block size {result.engine.block_size}):\n"
        f"  text unchanged   {trap.cached_same_text:>6,} of {trap.prompt_tokens:,}\n"
        f"  keys moved       [red]{trap.cached_keys_moved:>6,}[/] of {trap.prompt_tokens:,}"
        f"  (they part at token {trap.first_difference:,}: {lost:,} more to compute)\n"
        f"  canonical_json   [green]{trap.cached_canonical:>6,}[/] of {trap.canonical_prompt_tokens:,}"
        f"  (same text for both orders: {trap.canonical_text_equal})"
    )


def main(argv: list[str] | None = None) -> int:
    # steps_from checks the flags first: bad input fails before the engine starts.
    return lesson_main(
        argv, __doc__, add_args=add_lesson_args, check_args=steps_from, run=run, show_details=show_details
    )


if __name__ == "__main__":
    exit_with(main)
