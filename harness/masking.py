"""Lesson 6's measurements: is each generated call valid, where WRONG's requests leave the cache,
what each variant keeps in the KV cache, what the constraint costs, three ways to enforce one state.

The lesson (tool_masking_vs_removal.py) builds the requests and runs them; this module judges
what came back, with the explainer (harness.explain) on WRONG's requests, a bounded cache replayed
on the engine's own token IDs (a simulation, labelled so: harness.block_pool), and more requests
on the engine for the constraint's cost per output token and ``allowed_token_ids``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.backend import Backend, Message, Reply, RequestOptions
from harness.block_pool import BlockPool
from harness.console import console
from harness.errors import UserError
from harness.explain.analyze import LogExplainer
from harness.explain.formats import OPENAI, ChatRequest, LoggedResponse, LoggedUsage
from harness.explain.render import ChatRenderer
from harness.measure import VariantResult
from harness.model import resolve_model
from harness.prefix import PrefixCacheModel, common_prefix_len
from harness.scenario_tools import TOOLS_BY_NAME, State, Tool, tool_name
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

PROJECT_TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "chatml_tools.jinja"


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


# --------------------------------------------------------------------------- which template renders the tools


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
        at = common_prefix_len(old, new)  # the first tool that differs
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


@dataclass(frozen=True)
class Work:
    """The prompt tokens a variant's requests made the engine compute (not served from cache):
    in all, and from the second request on (the first is cold in every variant alike)."""

    name: str
    computed: int
    computed_warm: int  # from the second request on
    prompt_warm: int

    @property
    def miss_rate_warm(self) -> float:
        return self.computed_warm / self.prompt_warm if self.prompt_warm else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "computed_tokens": self.computed,
            "computed_tokens_after_first": self.computed_warm,
            "prompt_tokens_after_first": self.prompt_warm,
            "miss_rate_after_first": round(self.miss_rate_warm, 4),
        }


def work(variant: VariantResult) -> Work:
    computed = [r.prompt_tokens - r.cached_tokens for r in variant.requests]
    prompt_warm = sum(r.prompt_tokens for r in variant.requests[1:])
    return Work(variant.name, sum(computed), sum(computed[1:]), prompt_warm)


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
