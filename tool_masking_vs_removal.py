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

The task is scripted (harness/scenario_tools.py): every variant sends the same history, and each
request asks the model for the next call, which is checked against the state (allowed name,
arguments valid under that tool's schema) and timed. After the variants, pairs of requests on
RIGHT's prompts time the constraint's own cost per output token (constrained, then the same
number of tokens unconstrained); each variant's token IDs are replayed through a vLLM-like cache
of bounded size (a simulation, labelled so); and for one state (``--allowed``) the lesson shows the three
ways to enforce it side by side: the constraint, the prefill, and ``allowed_token_ids`` (a
one-token choice: the group's first token).

Run:
    python tool_masking_vs_removal.py                  # 15 steps, embedded default model
    python tool_masking_vs_removal.py --quick --json out.json
    python tool_masking_vs_removal.py --allowed shell
    python tool_masking_vs_removal.py --endpoint http://127.0.0.1:8000   # your vLLM server
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.backend import Backend, Message, Reply, RequestOptions
from harness.block_pool import BlockPool
from harness.cli import exit_with, lesson_main
from harness.console import Table, console, escape, mark
from harness.errors import UserError
from harness.explain.analyze import LogExplainer
from harness.explain.formats import OPENAI, ChatRequest, LoggedResponse, LoggedUsage
from harness.explain.render import ChatRenderer
from harness.measure import VariantResult, run_variants
from harness.model import resolve_model
from harness.prefix import PrefixCacheModel, common_prefix_len
from harness.report import ExampleResult, divergence_panel
from harness.scenario_tools import (
    STATES,
    STEPS,
    SYSTEM_PROMPT,
    TASK,
    TOOLS,
    TOOLS_BY_NAME,
    State,
    Tool,
    state_changes,
    tool_name,
)
from harness.tool_calls import (
    CALL_OPEN,
    STOP,
    CallCheck,
    ConstraintCost,
    CostPair,
    call_text,
    check_call,
    constraint,
    prefill,
)

EXAMPLE = "tool_masking_vs_removal"
DEFAULT_STEPS, QUICK_STEPS = len(STEPS), 2
DEFAULT_CALL_TOKENS, QUICK_CALL_TOKENS = 96, 40
DEFAULT_COST_PAIRS, QUICK_COST_PAIRS = 6, 1
TABLE_COLUMNS = ("state", "tools")
PROJECT_TEMPLATE = Path(__file__).resolve().parent / "examples" / "chatml_tools.jinja"

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


@dataclass(frozen=True)
class AgentRequest:
    """One request of a variant: the step it asks for, the state it is in, what it sends."""

    step: int
    state: State
    messages: list[Message]
    options: RequestOptions
    prefill: str = ""  # the start of the reply the prompt already holds (PREFILL)
    tools_in_prompt: int = 0


def unconstrained(tools: list[Tool], template: str | None) -> RequestOptions:
    return RequestOptions(tools=tools, chat_template=template, stop=STOP)


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


# --------------------------------------------------------------------------- is the call valid?


@dataclass(frozen=True)
class Validity:
    """One variant's calls, counted (valid: ``CallCheck.valid``)."""

    name: str
    calls: int
    complete: int  # whole calls, valid or not
    allowed: int  # naming a tool the state allows (a call cut short counts when its name is whole)
    valid: int
    cut: int  # replies the token budget ended before the call was whole

    @property
    def rate(self) -> float:
        return self.valid / self.calls if self.calls else 0.0

    @property
    def finished_valid(self) -> bool:
        """Every call that finished is valid: what a constraint guarantees by construction."""
        return self.valid == self.calls - self.cut

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls": self.calls,
            "complete": self.complete,
            "allowed": self.allowed,
            "valid": self.valid,
            "cut_by_budget": self.cut,
            "valid_rate": round(self.rate, 4),
        }


def judge(variant: VariantResult, requests: list[AgentRequest], tools: list[Tool]) -> Validity:
    """Check each generated call against its state and add what was found to its record (the
    JSON's per-request fields)."""
    checks: list[CallCheck] = []
    for record, request in zip(variant.requests, requests, strict=True):
        reply = record.reply
        assert reply is not None  # run_variant keeps every reply
        check = check_call(request.prefill + reply.text, tools, request.state.allows, reply.finish_reason)
        checks.append(check)
        ms = reply.ms_per_output_token()
        record.extra.update(
            state=request.state.name,
            tools=request.tools_in_prompt,
            call=check.name,
            valid=check.valid,
            problem=check.problem,
            output_tokens=reply.output_tokens,
            ms_per_output_token=round(ms, 3) if ms is not None else None,
            finish_reason=reply.finish_reason,
        )
    cut = sum(1 for c, r in zip(checks, variant.requests, strict=True) if not c.complete and _cut(r.reply))
    return Validity(
        variant.name,
        len(checks),
        sum(c.complete for c in checks),
        sum(c.allowed for c in checks),
        sum(c.valid for c in checks),
        cut,
    )


def _cut(reply: Reply | None) -> bool:
    return reply is not None and reply.finish_reason == "length"


# --------------------------------------------------------------------------- where WRONG leaves the cache


@dataclass(frozen=True)
class Break:
    """A WRONG request whose state, so tool list, changed: where it left the previous request,
    and what the engine could still serve it."""

    index: int
    states: tuple[str, str]  # (the previous request's state, this one's)
    leaves_previous_at: int  # first token not shared with the previous request's prompt
    tool_position: int  # the first tool (1-based) that differs from the previous request's list
    tools: tuple[str, str]  # (the previous list's tool there, this one's; "-": the list ended)
    cached_tokens: int  # the engine's count
    cached_from: int | None  # the earlier request those tokens came from (the explainer's cached_from)
    hint: str | None  # what the explainer says changed against its reference ("tools_changed")
    computed: int  # prompt tokens the engine computed for this request
    computed_right: int  # ... for RIGHT's request of the same step

    @property
    def return_visit(self) -> bool:
        """The state was visited before and its branch served more than the system prompt."""
        return self.cached_from is not None and self.cached_tokens > self.leaves_previous_at

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "states": list(self.states),
            "leaves_previous_at": self.leaves_previous_at,
            "tool_position": self.tool_position,
            "tools": list(self.tools),
            "cached_tokens": self.cached_tokens,
            "cached_from": self.cached_from,
            "hint": self.hint,
            "computed": self.computed,
            "computed_right": self.computed_right,
        }


def first_changed(old: list[str], new: list[str]) -> int:
    """Index of the first position where two tool lists differ."""
    return next(
        (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new))
    )


def explain_wrong(
    variant: VariantResult,
    requests: list[AgentRequest],
    right: VariantResult,
    renderer: ChatRenderer,
    block_size: int,
) -> tuple[list[Break], bool]:
    """Where each WRONG request whose state changed left the previous request (always in the tool
    list), and where its cached tokens came from: the explainer (harness.explain), fed WRONG's
    requests with their replies' token IDs (the engine caches generated tokens too), names the
    earlier request that serves them. The engine keeps every branch it computed, one per tool
    list: a return to a state finds the branch of its last visit there. Also returns whether the
    explainer's prediction equals the engine's count on every WRONG request."""
    explainer = LogExplainer(renderer, block_size)
    breaks: list[Break] = []
    agrees = True
    for i, (record, request) in enumerate(zip(variant.requests, requests, strict=True)):
        reply = record.reply
        assert reply is not None and reply.prompt_token_ids is not None
        body = {"messages": request.messages, "tools": list(request.options.tools or [])}
        usage = LoggedUsage(reply.prompt_tokens, reply.cached_tokens, None, reply.output_tokens)
        message = {"role": "assistant", "content": reply.text}
        response = LoggedResponse(message, reply.finish_reason, reply.output_token_ids, usage)
        explanation = explainer.explain(ChatRequest(i + 1, body, OPENAI, None, response=response))
        agrees = agrees and explanation.predicted_cached_tokens == record.cached_tokens
        previous = requests[i - 1] if i else None
        if previous is None or previous.state == request.state:
            continue
        before = variant.requests[i - 1].reply
        assert before is not None and before.prompt_token_ids is not None
        old = [tool_name(t) for t in previous.options.tools or []]
        new = [tool_name(t) for t in request.options.tools or []]
        at = first_changed(old, new)
        source = explanation.cached_from_line
        breaks.append(
            Break(
                index=i,
                states=(previous.state.name, request.state.name),
                leaves_previous_at=common_prefix_len(before.prompt_token_ids, reply.prompt_token_ids),
                tool_position=at + 1,
                tools=(old[at] if at < len(old) else "-", new[at] if at < len(new) else "-"),
                cached_tokens=record.cached_tokens,
                cached_from=source - 1 if source is not None else None,
                hint=explanation.hint.kind if explanation.hint is not None else None,
                computed=record.prompt_tokens - record.cached_tokens,
                computed_right=right.requests[i].prompt_tokens - right.requests[i].cached_tokens,
            )
        )
    return breaks, agrees


@dataclass(frozen=True)
class Footprint:
    """What a variant's session leaves in the KV cache, and a bounded cache replayed (SIMULATED)."""

    name: str
    blocks: int  # distinct full blocks the session computed (its prompts and replies): KV it holds
    bounded_blocks: int  # the simulated cache: the blocks RIGHT's longest request needs
    bounded_hit_rate: float  # this variant's hit rate replayed through that cache (harness.block_pool)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "blocks": self.blocks,
            "simulated_cache_blocks": self.bounded_blocks,
            "simulated_hit_rate": round(self.bounded_hit_rate, 4),
        }


def footprints(variants: list[VariantResult], block_size: int) -> list[Footprint]:
    """Replay each variant's exact token sequences (prompt and reply, as the engine reported
    them): into the unbounded model, to count the blocks it keeps (WRONG keeps one branch of the
    conversation per tool list), and through a vLLM-like pool with only the blocks RIGHT's
    longest request needs, where branches evict each other (a server busy with other sessions)."""
    right = next(v for v in variants if v.name == "right")
    replies = [r.reply for r in right.requests if r.reply is not None]
    longest = max(len(r.prompt_token_ids or []) + (r.output_tokens or 0) for r in replies)
    size = -(-longest // block_size) + 1
    out = []
    for variant in variants:
        unbounded, pool = PrefixCacheModel(block_size), BlockPool(block_size, size).namespace("session")
        hits = total = 0
        for record in variant.requests:
            assert record.reply is not None and record.reply.prompt_token_ids is not None
            prompt, output = record.reply.prompt_token_ids, record.reply.output_token_ids or []
            hits += pool.predict(prompt).cached_tokens
            total += len(prompt)
            pool.record(prompt, output)
            unbounded.record(prompt, output)
        out.append(Footprint(variant.name, unbounded.blocks, size, hits / total if total else 0.0))
    return out


# --------------------------------------------------------------------------- what the constraint costs


@dataclass(frozen=True)
class Compile:
    """A state's constraint sent once before the variants run: the engine compiles a grammar on
    its first use and keeps it, so RIGHT's TTFT is that of a server that has seen each state."""

    state: str
    tools: int  # alternatives in the constraint
    ttft_ms: float  # a tiny prompt: mostly the compile

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "tools": self.tools, "ttft_ms": round(self.ttft_ms, 3)}


def compile_constraints(backend: Backend, states: list[State], tools: list[Tool]) -> list[Compile]:
    out = []
    with console.status("compiling each state's constraint once (a grammar is compiled on first use) ..."):
        for state in states:
            allowed = state.allowed(tools)
            options = RequestOptions(structured_outputs=constraint(allowed))
            reply = backend.generate([{"role": "user", "content": "Hi"}], max_tokens=1, options=options)
            out.append(Compile(state.name, len(allowed), reply.ttft_ms))
    return out


def constraint_cost(
    backend: Backend, right: VariantResult, requests: list[AgentRequest], pairs: int, call_tokens: int
) -> ConstraintCost:
    """Time decoding with and without the constraint, on the same prompts and token counts.

    The prompts are RIGHT's whose reply had at least 8 tokens, spread over the run; each pair
    sends the constrained request again and the same request unconstrained for exactly as many
    tokens, back to back, in alternating order (a drift of the machine's speed falls on both
    sides alike). Decoding alone is timed: from the first token to the last.
    """
    usable = [
        (record, request)
        for record, request in zip(right.requests, requests, strict=True)
        if record.reply is not None and (record.reply.output_tokens or 0) >= 8
    ]
    if pairs <= 0 or not usable:
        return ConstraintCost([])
    chosen = usable[:: max(1, len(usable) // pairs)][:pairs]
    out: list[CostPair] = []
    with console.status(f"timing the constraint: {len(chosen)} pairs of requests, with and without it ..."):
        for i, (record, request) in enumerate(chosen):
            assert record.reply is not None
            n = int(record.reply.output_tokens or 0)
            free = replace(request.options, structured_outputs=None, min_tokens=n)
            sides = [(True, request.options, call_tokens), (False, free, n)]
            timed: dict[bool, Reply] = {}
            for constrained, options, budget in sides if i % 2 == 0 else sides[::-1]:
                timed[constrained] = backend.generate(request.messages, max_tokens=budget, options=options)
            with_it, without = timed[True], timed[False]
            mc, mu = with_it.ms_per_output_token(), without.ms_per_output_token()
            # Greedy decoding gives the constrained reply its length again; if not, no pair.
            if with_it.output_tokens == n == without.output_tokens and mc is not None and mu is not None:
                out.append(CostPair(request.step, n, mc, mu))
    return ConstraintCost(out)


# --------------------------------------------------------------------------- three ways, one state


@dataclass(frozen=True)
class Enforcement:
    """One way to enforce a state's tools, as the lesson ran it on that state's last request."""

    way: str
    sends: str  # what the request carries
    reply: str  # what came back, the prefill included
    valid: bool | None  # the call's validity (None: one token, not a call, by design)
    allowed_start: bool  # the reply so far is the start of an allowed tool's call
    ttft_ms: float
    output_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "way": self.way,
            "sends": self.sends,
            "reply": self.reply,
            "valid": self.valid,
            "allowed_start": self.allowed_start,
            "ttft_ms": round(self.ttft_ms, 3),
            "output_tokens": self.output_tokens,
        }


def first_name_tokens(backend: Backend, state: State, tools: list[Tool], base: AgentRequest) -> list[int]:
    """The token each allowed tool's name starts with, right after ``{"name": "`` in the prompt
    (rendered, not guessed: a tokenizer may merge text across the join)."""
    options = replace(base.options, structured_outputs=None, continue_final_message=True)
    opened = backend.render([*base.messages, {"role": "assistant", "content": CALL_OPEN}], options)
    firsts: list[int] = []
    for tool in state.allowed(tools):
        name = [*base.messages, {"role": "assistant", "content": CALL_OPEN + tool_name(tool)}]
        ids = backend.render(name, options)
        if ids[: len(opened)] != opened:
            raise UserError(
                f"the tokenizer merges the call's opening with {tool_name(tool)}: no one-token choice"
            )
        if ids[len(opened)] not in firsts:
            firsts.append(ids[len(opened)])
    return firsts


def three_ways(
    backend: Backend,
    state: State,
    variants: dict[str, VariantResult],
    built: dict[str, list[AgentRequest]],
    tools: list[Tool],
) -> list[Enforcement]:
    """For the last request in ``state``: the constraint (RIGHT's reply), the prefill (PREFILL's),
    and ``allowed_token_ids`` on one more request: the call opened up to the name, and one token
    allowed among the first tokens of the allowed tools' names."""
    index = max(i for i, r in enumerate(built["right"]) if r.state == state)
    allowed = state.allowed(tools)
    out = []
    for way, name, sends in (
        (
            "grammar",
            "right",
            f"structured_outputs: a structural tag, one tag per allowed tool ({len(allowed)})",
        ),
        ("prefill", "prefill", f"continue_final_message after {prefill(state.prefill_group)!r}"),
    ):
        record, request = variants[name].requests[index], built[name][index]
        assert record.reply is not None
        text = request.prefill + record.reply.text
        check = check_call(text, tools, state.allows, record.reply.finish_reason)
        tokens = record.reply.output_tokens or 0
        out.append(Enforcement(way, sends, text, check.valid, check.allowed, record.ttft_ms, tokens))
    base = built["right"][index]
    firsts = first_name_tokens(backend, state, tools, base)
    options = replace(
        base.options,
        structured_outputs=None,
        continue_final_message=True,
        allowed_token_ids=firsts,
        stop=None,
    )
    opened = [*base.messages, {"role": "assistant", "content": CALL_OPEN}]
    reply = backend.generate(opened, max_tokens=1, options=options)
    text = CALL_OPEN + reply.text
    shown = ", ".join(repr(backend.decode([t])) for t in firsts)
    starts = any(call_text(tool_name(t), {}).startswith(text) for t in allowed)
    sends = f"allowed_token_ids: {len(firsts)} IDs ({shown}), max_tokens 1, after {CALL_OPEN!r}"
    out.append(
        Enforcement("allowed_token_ids", sends, text, None, starts, reply.ttft_ms, reply.output_tokens or 0)
    )
    return out


# --------------------------------------------------------------------------- the result


@dataclass
class MaskingResult(ExampleResult):
    """The shared result plus the calls' validity, WRONG's breaks, the constraint's costs and the
    three ways to enforce one state, typed until the JSON."""

    validity: list[Validity] = field(kw_only=True)
    breaks: list[Break] = field(kw_only=True)
    explainer_agrees: bool = field(kw_only=True)
    footprints: list[Footprint] = field(kw_only=True)
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


@lru_cache(maxsize=4)
def tools_renderer(model: str | None, template: bool) -> ChatRenderer:
    """vLLM's chat rendering without an engine (the explainer's), with the template the requests use."""
    return ChatRenderer(resolve_model(model).name_or_path, PROJECT_TEMPLATE if template else None)


def local_renderer(
    backend: Backend, model: str | None, request: AgentRequest, template: bool
) -> ChatRenderer:
    """The explainer's renderer that gives the engine's very tokens for this lesson's requests:
    with the project's template when the requests carry it; otherwise (the model's or the
    server's own template) the model's own, or else the project's (a server started with
    ``--chat-template examples/chatml_tools.jinja``)."""
    body = {"messages": request.messages, "tools": list(request.options.tools or [])}
    engine_ids = backend.render(request.messages, request.options)
    for candidate in (True,) if template else (False, True):
        renderer = tools_renderer(model, candidate)
        if renderer.render(ChatRequest(0, body, OPENAI, None)).token_ids == engine_ids:
            return renderer
    raise UserError(
        "the local tokenizer renders these prompts differently from the engine: pass --model naming "
        "the model the server runs"
    )


PROBE_TOOL, PROBE_ARGUMENTS = "file_read", {"path": "/tmp/probe.txt"}


def renders_calls(text: str) -> bool:
    """Does a prompt's text hold the probe tool's schema and, after it, its call in the Hermes layout?"""
    call = call_text(PROBE_TOOL, PROBE_ARGUMENTS)
    return call in text and f'"name": "{PROBE_TOOL}"' in text.split(call)[0]


def choose_template(backend: Backend) -> str | None:
    """The chat template that renders this lesson's tools and calls: the model's own (on a server,
    the server's) when it does; else, on the embedded engine, the project's Hermes-style ChatML
    template (examples/chatml_tools.jinja), whose text is returned. ``None``: the own one."""
    call = {"name": PROBE_TOOL, "arguments": json.dumps(PROBE_ARGUMENTS)}
    probe: list[Message] = [
        {"role": "system", "content": "probe"},
        {"role": "user", "content": "probe"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c0", "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "probe"},
    ]
    tools = [TOOLS_BY_NAME[PROBE_TOOL]]
    if renders_calls(backend.decode(backend.render(probe, RequestOptions(tools=tools)))):
        return None
    if backend.info.backend == "vllm-server":
        raise UserError(
            "the server's chat template does not render tools and <tool_call> calls: start it with "
            "--chat-template examples/chatml_tools.jinja (a ChatML model) or serve a model whose "
            "template writes Hermes-style calls (e.g. Qwen2.5)"
        )
    template = PROJECT_TEMPLATE.read_text()
    if not renders_calls(
        backend.decode(backend.render(probe, RequestOptions(tools=tools, chat_template=template)))
    ):
        raise UserError(f"neither the model's chat template nor {PROJECT_TEMPLATE.name} renders tool calls")
    return template


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
