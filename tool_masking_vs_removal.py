"""Lesson 6: mask the tools an agent may not use at decode time; do not remove them from the prompt.

An agent whose allowed actions depend on its state (reading web pages, running commands, editing
files, answering its user) is tempted to send only the tools allowed right now. Chat templates
render the tool list near the top of the prompt, in the system message, so every change of state
rewrites it, and the engine's prefix cache (vLLM's APC: whole blocks, hashed in a chain) can serve
only the blocks before the first changed tool from the request before. The cache is a tree,
though: it keeps one branch per tool list it has seen. A first visit to a state computes the whole
conversation again; a return finds the branch its last visit left and computes the conversation
since. Each branch is one more copy of the conversation's KV, which a busy server evicts. The
history also shows calls to tools the prompt no longer defines.

WRONG: remove. Each request carries only the tools its state allows.

RIGHT: mask. Every request carries the full tool list, in one order, byte-identical; what is
allowed is enforced while decoding. vLLM's structured outputs take a constraint whose alternatives
are the allowed tools, here a structural tag: one tag per allowed tool, opening with the call's
own text up to its arguments (``<tool_call>\\n{"name": "browser_navigate", "arguments": ``), the
arguments under that tool's JSON schema, then ``}\\n</tool_call>``. The engine masks every token
that would leave the constraint, so a finished call names an allowed tool and parses against its
schema by construction (the lesson checks it from the generated text anyway).

PREFILL: the same full list, and the agent writes the start of the reply itself: the prompt ends
inside the assistant message, up to the state's group prefix (``<tool_call>\\n{"name": "browser_``,
vLLM's ``continue_final_message``). Tool names that share a prefix per group make one prefill pick
a whole group; nothing constrains the rest.

FULL: the same full list with no enforcement at all: what masking adds to validity.

The task is scripted (harness/scenario_tools.py; the calls, the constraint and the checker in
harness/tool_calls.py; what is measured beyond the variants in harness/masking.py): every variant
sends the same history, and each request asks the model for the next call, which is checked against
the state (allowed name, arguments valid under that tool's schema) and timed. After the variants,
pairs of requests on RIGHT's prompts time the constraint's own cost per output token (constrained,
then the same number of tokens unconstrained); each variant's token IDs are replayed through a
vLLM-like cache of bounded size (a simulation, labelled so); and for one state (``--allowed``) the
lesson shows the three ways to enforce it side by side: the constraint, the prefill, and
``allowed_token_ids`` (a one-token choice: the group's first token).

Run:
    python tool_masking_vs_removal.py                  # 15 steps, embedded default model
    python tool_masking_vs_removal.py --quick --json out.json
    python tool_masking_vs_removal.py --allowed shell
    python tool_masking_vs_removal.py --endpoint http://127.0.0.1:8000   # your vLLM server
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

from harness.backend import Backend, Message, RequestOptions
from harness.cli import exit_with, lesson_main
from harness.console import Table, console, escape, mark
from harness.errors import UserError
from harness.masking import (
    PROJECT_TEMPLATE,
    AgentRequest,
    Break,
    Compile,
    Enforcement,
    Footprint,
    Validity,
    Work,
    choose_template,
    compile_constraints,
    constraint_cost,
    explain_wrong,
    footprints,
    judge,
    local_renderer,
    three_ways,
    unconstrained,
    work,
)
from harness.measure import run_variants
from harness.report import ExampleResult, divergence_panel
from harness.scenario_tools import (
    STATES,
    STEPS,
    SYSTEM_PROMPT,
    TASK,
    TOOLS,
    State,
    Tool,
    state_changes,
    tool_name,
)
from harness.tool_calls import ConstraintCost, constraint, prefill

EXAMPLE = "tool_masking_vs_removal"
DEFAULT_STEPS, QUICK_STEPS = len(STEPS), 2
DEFAULT_CALL_TOKENS, QUICK_CALL_TOKENS = 96, 40
DEFAULT_COST_PAIRS, QUICK_COST_PAIRS = 6, 1
TABLE_COLUMNS = ("state", "tools")

# Quick mode keeps two tools per group, among them every tool its steps call.
QUICK_TOOL_NAMES = (
    "browser_find_text",
    "browser_navigate",
    "file_read",
    "file_str_replace",
    "message_ask_user",
    "message_notify_user",
    "shell_exec",
    "shell_view",
)


def tool_set(quick: bool) -> list[Tool]:
    """The agent's full tool list, in its one fixed order (sorted by name)."""
    return [t for t in TOOLS if tool_name(t) in QUICK_TOOL_NAMES] if quick else list(TOOLS)


def history(step: int) -> list[Message]:
    """What every variant's request for ``step`` holds: the system prompt and the task, then for
    each step before it the agent's call and the tool's answer (and a user message where one
    arrived), as an OpenAI chat: the template renders calls and answers in its own format."""
    messages: list[Message] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": TASK},
    ]
    for index, done in enumerate(STEPS[: step + 1]):
        if done.user_message:
            messages.append({"role": "user", "content": done.user_message})
        if index == step:
            break
        call = {"name": done.tool, "arguments": done.arguments_json()}
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"call_{index}", "type": "function", "function": call}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": f"call_{index}", "content": done.result})
    return messages


# --------------------------------------------------------------------------- WRONG


def build_wrong(steps: int, quick: bool = False, template: str | None = None) -> list[AgentRequest]:
    """Each step's request with only the tools its state allows: the tool list changes with the state."""
    tools = tool_set(quick)
    requests = []
    for step in range(steps):
        state = STATES[STEPS[step].state]
        allowed = state.allowed(tools)
        options = unconstrained(allowed, template)
        requests.append(AgentRequest(step, state, history(step), options, tools_in_prompt=len(allowed)))
    return requests


# --------------------------------------------------------------------------- RIGHT


def build_right(steps: int, quick: bool = False, template: str | None = None) -> list[AgentRequest]:
    """The same steps with the full tool list on every request; the state's tools enforced by a
    decoding constraint."""
    tools = tool_set(quick)
    requests = []
    for step in range(steps):
        state = STATES[STEPS[step].state]
        options = RequestOptions(
            tools=tools, chat_template=template, structured_outputs=constraint(state.allowed(tools))
        )
        requests.append(AgentRequest(step, state, history(step), options, tools_in_prompt=len(tools)))
    return requests


def build_prefill(steps: int, quick: bool = False, template: str | None = None) -> list[AgentRequest]:
    """The full tool list; the reply's start, up to the state's group prefix, written into the prompt."""
    tools = tool_set(quick)
    requests = []
    for step in range(steps):
        state = STATES[STEPS[step].state]
        text = prefill(state.prefill_group)
        messages = [*history(step), {"role": "assistant", "content": text}]
        options = replace(unconstrained(tools, template), continue_final_message=True)
        requests.append(AgentRequest(step, state, messages, options, text, len(tools)))
    return requests


def build_full(steps: int, quick: bool = False, template: str | None = None) -> list[AgentRequest]:
    """The full tool list and nothing enforced: the prompts RIGHT sends, without the constraint."""
    tools = tool_set(quick)
    return [
        AgentRequest(
            step, STATES[STEPS[step].state], history(step), unconstrained(tools, template), "", len(tools)
        )
        for step in range(steps)
    ]


VARIANTS = [
    ("wrong", "only the tools the state allows, in the prompt", build_wrong),
    (
        "right",
        "full tool list, byte-stable; the state's tools enforced by a decoding constraint",
        build_right,
    ),
    ("prefill", "full tool list; the call's start, up to the state's group, prefilled", build_prefill),
    ("full", "full tool list, nothing enforced (what masking adds to validity)", build_full),
]


# --------------------------------------------------------------------------- the result


@dataclass
class MaskingResult(ExampleResult):
    """The shared result plus the calls' validity, WRONG's breaks, the constraint's costs and the
    three ways to enforce one state, typed until the JSON."""

    validity: list[Validity] = field(kw_only=True)
    breaks: list[Break] = field(kw_only=True)
    explainer_agrees: bool = field(kw_only=True)
    footprints: list[Footprint] = field(kw_only=True)
    work: list[Work] = field(kw_only=True)
    compiles: list[Compile] = field(kw_only=True)
    cost: ConstraintCost = field(kw_only=True)
    enforcement_state: str = field(kw_only=True)
    enforcement: list[Enforcement] = field(kw_only=True)
    template: str = field(kw_only=True)

    def validity_of(self, name: str) -> Validity:
        return next(v for v in self.validity if v.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "validity": {
                "rule": "valid: the reply holds one <tool_call> whose JSON names a tool the request's state "
                "allows, with arguments that validate against that tool's JSON schema",
                "variants": [v.to_json() for v in self.validity],
                "constraint_compile": [c.to_json() for c in self.compiles],
                "constraint_cost": self.cost.to_json(),
                "enforcement": {
                    "state": self.enforcement_state,
                    "ways": [e.to_json() for e in self.enforcement],
                },
            },
            "tool_list_breaks": [b.to_json() for b in self.breaks],
            "cache_footprint": [f.to_json() for f in self.footprints],
            "prefill_work": [w.to_json() for w in self.work],
            "explainer_agrees_with_engine": self.explainer_agrees,
            "chat_template": self.template,
        }


# --------------------------------------------------------------------------- running it


def add_lesson_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"steps of the scripted task (requests per variant), 2 to {len(STEPS)} "
        f"(default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)",
    )
    parser.add_argument(
        "--allowed",
        metavar="STATE",
        default=None,
        help=f"the state whose three ways of enforcement are shown ({', '.join(STATES)}; default: browse, "
        "which allows two groups",
    )
    parser.add_argument(
        "--call-tokens",
        type=int,
        default=None,
        help=f"tokens each request may generate for its call (default {DEFAULT_CALL_TOKENS}, "
        f"{QUICK_CALL_TOKENS} with --quick); --max-tokens does not apply to this lesson",
    )
    parser.add_argument(
        "--cost-pairs",
        type=int,
        default=None,
        help=f"pairs of requests that time the constraint per output token (default {DEFAULT_COST_PAIRS}, "
        f"{QUICK_COST_PAIRS} with --quick; 0: skip)",
    )


@dataclass(frozen=True)
class Settings:
    steps: int
    allowed: State
    call_tokens: int
    cost_pairs: int
    quick: bool


def settings_from(args: argparse.Namespace) -> Settings:
    """The lesson's flags, checked before anything slow starts."""
    quick = bool(args.quick)

    def given(value: int | None, default: int, quick_default: int) -> int:
        return int(value if value is not None else (quick_default if quick else default))  # 0 is a value

    steps = given(args.steps, DEFAULT_STEPS, QUICK_STEPS)
    if not 2 <= steps <= len(STEPS):
        raise UserError(
            f"--steps must be between 2 and {len(STEPS)} (the scripted task's steps), got {steps}"
        )
    used = list(dict.fromkeys(STEPS[i].state for i in range(steps)))
    name = args.allowed if args.allowed is not None else ("browse" if "browse" in used else used[-1])
    if name not in STATES:
        raise UserError(f"--allowed {name}: no such state; the states are {', '.join(STATES)}")
    if name not in used:
        raise UserError(
            f"--allowed {name}: the first {steps} steps are never in it (only in {', '.join(used)})"
        )
    call_tokens = given(args.call_tokens, DEFAULT_CALL_TOKENS, QUICK_CALL_TOKENS)
    if call_tokens < 16:
        raise UserError(
            f"--call-tokens must be at least 16 (a call's opening alone is about 12), got {call_tokens}"
        )
    pairs = given(args.cost_pairs, DEFAULT_COST_PAIRS, QUICK_COST_PAIRS)
    if pairs < 0:
        raise UserError(f"--cost-pairs must be 0 or more, got {pairs}")
    return Settings(steps, STATES[name], call_tokens, pairs, quick)


def run(backend: Backend, args: argparse.Namespace) -> MaskingResult:
    settings = settings_from(args)
    template = choose_template(backend)
    tools = tool_set(settings.quick)
    built = {name: build(settings.steps, settings.quick, template) for name, _, build in VARIANTS}
    renderer = local_renderer(backend, args.model, built["wrong"][0], template is not None)
    states = list(dict.fromkeys(r.state for r in built["right"]))
    compiles = compile_constraints(backend, states, tools)
    variants = run_variants(
        backend,
        [(name, label, [r.messages for r in built[name]]) for name, label, _ in VARIANTS],
        settings.call_tokens,
        options={name: [r.options for r in requests] for name, requests in built.items()},
    )
    by_name = {v.name: v for v in variants}
    validity = [judge(by_name[name], built[name], tools) for name, _, _ in VARIANTS]
    block_size = backend.info.block_size
    breaks, agrees = explain_wrong(by_name["wrong"], built["wrong"], by_name["right"], renderer, block_size)
    cost = constraint_cost(
        backend, by_name["right"], built["right"], settings.cost_pairs, settings.call_tokens
    )
    enforcement = three_ways(backend, settings.allowed, by_name, built, tools)
    changes = state_changes(STEPS[: settings.steps])
    return MaskingResult(
        EXAMPLE,
        backend.info,
        variants,
        notes=[
            f"{settings.steps} steps per variant, {len(tools)} tools; the state changes on {changes} of the "
            f"{settings.steps - 1} steps after the first; up to {settings.call_tokens} tokens per call; each "
            "variant starts from an empty cache, in the order shown; each state's constraint was compiled "
            "before the variants (see the compile line)"
        ],
        validity=validity,
        breaks=breaks,
        explainer_agrees=agrees,
        footprints=footprints(variants, block_size),
        work=[work(v) for v in variants],
        compiles=compiles,
        cost=cost,
        enforcement_state=settings.allowed.name,
        enforcement=enforcement,
        template=PROJECT_TEMPLATE.name if template is not None else "the model's own",
    )


# --------------------------------------------------------------------------- showing it


def calls_table(result: MaskingResult) -> Table:
    """Per step: the state, and each variant's call (the tool named; why it is not valid)."""
    title = "The call each variant generated (green: valid, an allowed tool with valid arguments)"
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("state")
    for name, _, _ in VARIANTS:
        table.add_column(name.upper())
    records = {v.name: v.requests for v in result.variants}
    for i, first in enumerate(records["wrong"]):
        row = [str(i), str(first.extra["state"])]
        for name, _, _ in VARIANTS:
            extra = records[name][i].extra
            call = escape(str(extra["call"] or "-"))
            why = escape(str(extra["problem"]))
            row.append(f"[green]{call}[/]" if extra["valid"] else f"[red]{call}[/] [dim]{why}[/]")
        table.add_row(*row)
    return table


def validity_table(result: MaskingResult) -> Table:
    table = Table(title="Validity of the generated calls, next to the cache", title_justify="left")
    columns = (
        "variant",
        "valid",
        "whole calls",
        "allowed name",
        "cut by budget",
        "hit rate",
        "TTFT median ms",
    )
    for column in (*columns, "ms / output token"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in result.validity:
        summary = result.variant(v.name).summary()
        replies = [r.reply for r in result.variant(v.name).requests if r.reply is not None]
        tokens = sum(max(0, (r.output_tokens or 0) - 1) for r in replies)
        decode = sum(r.decode_ms or 0.0 for r in replies)
        table.add_row(
            v.name.upper(),
            f"{v.valid}/{v.calls} ({v.rate:.0%})",
            str(v.complete),
            str(v.allowed),
            str(v.cut),
            f"{summary['hit_rate']:.1%}",
            f"{summary['ttft_ms_median']:,.0f}",
            f"{decode / tokens:,.1f}" if tokens else "-",
        )
    return table


def breaks_table(result: MaskingResult) -> Table:
    title = "WRONG: each change of state, against the previous request (whose list it changes) and the cache"
    table = Table(title=title, title_justify="left")
    right_aligned = ("#", "leaves previous at", "cached", "computed", "RIGHT computed")
    columns = ("#", "state change", "leaves previous at", "first changed tool", "cached", "served from")
    for column in (*columns, "computed", "RIGHT computed"):
        table.add_column(column, justify="right" if column in right_aligned else "left")
    states = {r.index: r.extra["state"] for r in result.variant("wrong").requests}
    for b in result.breaks:
        if b.return_visit:
            source = f"#{b.cached_from} ({states[b.cached_from]}): its last visit"
        else:
            source = "the prompt before the tool list"
        table.add_row(
            str(b.index),
            f"{b.states[0]} -> {b.states[1]}",
            str(b.leaves_previous_at),
            f"#{b.tool_position}: {b.tools[0]} -> {b.tools[1]}",
            f"{b.cached_tokens:,}",
            source,
            f"{b.computed:,}",
            f"{b.computed_right:,}",
        )
    return table


def enforcement_table(result: MaskingResult) -> Table:
    title = f"Three ways to enforce state '{result.enforcement_state}' (on its last request)"
    table = Table(title=title, title_justify="left")
    for column in ("way", "the request carries", "reply (prefill included)", "valid", "TTFT ms", "tokens"):
        table.add_column(column, justify="right" if column in ("TTFT ms", "tokens") else "left")
    for e in result.enforcement:
        valid = mark(e.valid) if e.valid is not None else f"starts allowed: {mark(e.allowed_start)}"
        reply = e.reply.replace("\n", "⏎")
        shown = reply[:90] + ("…" if len(reply) > 90 else "")
        table.add_row(e.way, escape(e.sends), escape(shown), valid, f"{e.ttft_ms:,.0f}", str(e.output_tokens))
    return table


def headline(result: ExampleResult) -> str:
    """The lesson's own figure for the runner: valid calls, WRONG against RIGHT."""
    if not isinstance(result, MaskingResult):
        return ""
    w, r, f = (result.validity_of(name) for name in ("wrong", "right", "full"))
    return f"valid calls WRONG {w.rate:.0%} -> RIGHT {r.rate:.0%} (full list, unconstrained {f.rate:.0%})"


def show_details(result: ExampleResult) -> None:
    if not isinstance(result, MaskingResult):
        raise TypeError(f"lesson 6 shows its own results, got {type(result).__name__}")
    console.print(breaks_table(result))
    if result.breaks:
        record = result.variant("wrong").requests[result.breaks[0].index]
        console.print(
            divergence_panel(record, f"WRONG request {record.index}: where the tool list left the cache")
        )
        first = [b for b in result.breaks if not b.return_visit]
        back = [b for b in result.breaks if b.return_visit]
        extra = sum(b.computed - b.computed_right for b in result.breaks)
        console.print(
            f"WRONG: {len(first)} first visits to a state kept only the prompt before the tool list; "
            f"{len(back)} returns found the branch of their last visit and computed the conversation since. "
            f"The {len(result.breaks)} changes computed {extra:,} tokens more than RIGHT's same steps. "
            "The explainer's prediction == the engine on every WRONG request: "
            f"{mark(result.explainer_agrees)}."
        )
    w, r = (next(x for x in result.work if x.name == name) for name in ("wrong", "right"))
    console.print(
        f"Prompt tokens the engine computed (not served from cache): WRONG {w.computed:,}, RIGHT "
        f"{r.computed:,} ({w.computed / max(r.computed, 1):.1f}x); after each variant's first request (cold "
        f"in both) {w.computed_warm:,} vs {r.computed_warm:,} "
        f"({w.computed_warm / max(r.computed_warm, 1):.1f}x the prefill work: misses of "
        f"{w.miss_rate_warm:.1%} vs {r.miss_rate_warm:.1%}, though hit rates of "
        f"{1 - w.miss_rate_warm:.1%} vs {1 - r.miss_rate_warm:.1%} look close)."
    )
    blocks = ", ".join(f"{f.name.upper()} {f.blocks:,}" for f in result.footprints)
    simulated = ", ".join(f"{f.name.upper()} {f.bounded_hit_rate:.1%}" for f in result.footprints)
    size = result.footprints[0].bounded_blocks if result.footprints else 0
    console.print(
        f"KV blocks each session leaves in the cache (one branch per tool list): {blocks}.\n"
        f"SIMULATED (harness/block_pool.py, the same token IDs): with only the {size} blocks RIGHT's longest "
        f"request needs, as on a server busy with other sessions, the hit rates would be {simulated}."
    )
    console.print(calls_table(result))
    console.print(validity_table(result))
    right = result.validity_of("right")
    console.print(
        f"RIGHT: every call the constraint let finish is valid: {mark(right.finished_valid)} "
        f"({right.valid} of {right.calls - right.cut}; {right.cut} cut by the token budget, "
        f"{right.allowed} of {right.calls} name an allowed tool)."
    )
    if result.compiles:
        each = ", ".join(f"{c.state} {c.ttft_ms:,.0f} ms ({c.tools} tools)" for c in result.compiles)
        console.print(f"Compiling each state's constraint on first use (a tiny prompt's TTFT): {each}.")
    cost = result.cost
    if cost.pairs:
        mean, error = cost.overhead()
        spread = f" ± {error:.1f} (standard error)" if error is not None else ""
        console.print(
            f"The constraint's cost per output token, {len(cost.pairs)} pairs on RIGHT's prompts, "
            f"{cost.output_tokens:,} tokens a side: {cost.ms_per_token(True):.1f} ms with it, "
            f"{cost.ms_per_token(False):.1f} ms without; {mean:+.1f} ms{spread}, median pair "
            f"{cost.median_overhead_ms():+.1f} ms: {cost.verdict()}."
        )
    console.print(enforcement_table(result))
    console.print(f"[dim]chat template: {escape(result.template)}[/]")


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
