"""Tool calls as a Hermes-style chat template writes them, and enforcing at decode time which tools
a reply may call: lesson 6's machinery.

The layout (examples/chatml_tools.jinja, Qwen2.5, NousResearch Hermes)::

    <tool_call>
    {"name": "browser_navigate", "arguments": {"url": "https://..."}}
    </tool_call>

Three ways to make a reply call only some of the tools in the prompt, all from vLLM's request
options (``harness.backend.RequestOptions``):

* ``constraint``: a structured-outputs constraint (an xgrammar structural tag) with one
  alternative per allowed tool, each the call's own text up to the arguments, the arguments under
  that tool's JSON schema, and the call's end. Whatever the model prefers, a finished reply is a
  valid call to an allowed tool;
* ``prefill``: the start of the call written into the prompt (an assistant message the model
  continues), up to a group's name prefix: the reply can only be a call in that group, and
  nothing checks the rest;
* ``allowed_token_ids``: every generated token must be one of a set: the tool for a one-token
  decision (which group), not for a whole call.

``check_call`` reads a reply the way a Hermes-style parser does and judges it; ``ConstraintCost``
holds timed pairs of replies (with and without a constraint, same prompt, same token count): the
constraint's own cost per output token.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from harness.scenario_tools import Tool, tool_name

CALL_OPEN = '<tool_call>\n{"name": "'
CALL_ARGUMENTS = '", "arguments": '
CALL_CLOSE = "}\n</tool_call>"
# Where an unconstrained reply ends: the call's end, or the model starting to write a tool's answer
# itself (what an agent loop stops at with a Hermes-style model).
STOP = ("</tool_call>", "<tool_response>")


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """One call exactly as the template renders it (``tojson`` of the arguments)."""
    return f"{CALL_OPEN}{name}{CALL_ARGUMENTS}{json.dumps(arguments)}{CALL_CLOSE}"


def constraint(allowed: Iterable[Tool]) -> dict[str, Any]:
    """vLLM's structured-outputs field for a reply that must be one call to one of ``allowed``.

    One tag per tool, the alternatives joined by ``or``: the tag opens with the call's text up to
    its arguments (so the name is one of the allowed ones, token for token), holds the arguments
    as JSON under that tool's own schema, and closes the call. ``max_whitespace_cnt`` keeps a
    model from padding the JSON with whitespace for ever (the tiny default model would).
    """
    tags = [
        {
            "type": "tag",
            "begin": f"{CALL_OPEN}{tool_name(tool)}{CALL_ARGUMENTS}",
            "content": {
                "type": "json_schema",
                "json_schema": tool["function"]["parameters"],
                "max_whitespace_cnt": 1,
            },
            "end": CALL_CLOSE,
        }
        for tool in allowed
    ]
    if not tags:
        raise ValueError("a constraint needs at least one allowed tool")
    spec = {"type": "structural_tag", "format": {"type": "or", "elements": tags}}
    return {"structural_tag": json.dumps(spec)}


def prefill(group: str) -> str:
    """The start of a call to a tool of ``group`` (names share the prefix ``group_``)."""
    return f"{CALL_OPEN}{group}_"


@dataclass(frozen=True)
class CallCheck:
    """What one reply called, judged against the tools its request allowed."""

    name: str | None  # the tool it named (None: no call, or no name could be read)
    complete: bool  # a whole call: <tool_call> and one JSON object with a name and arguments
    allowed: bool  # the name is one of the allowed tools
    arguments_valid: bool  # the arguments validate against that tool's JSON schema
    problem: str  # why the call is not valid, in a few words ("" when it is)

    @property
    def valid(self) -> bool:
        return self.complete and self.allowed and self.arguments_valid


def check_call(
    text: str, tools: Iterable[Tool], allows: Callable[[str], bool], finish_reason: str | None = None
) -> CallCheck:
    """Read the first ``<tool_call>`` of a reply (a prefill included) as a Hermes-style parser
    does, and judge it: the name must be a tool of the request's list (``tools``) that ``allows``
    accepts, and the arguments must validate against that tool's schema (JSON Schema 2020-12).
    ``finish_reason`` "length" marks a reply the token budget ended."""
    import jsonschema

    schemas = {tool_name(t): t["function"]["parameters"] for t in tools}
    cut = finish_reason == "length"
    start = text.find("<tool_call>")
    if start < 0:
        return CallCheck(None, False, False, False, "cut by the budget, no call" if cut else "no tool call")
    body = text[start + len("<tool_call>") :].lstrip()
    try:
        call, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        name = _name_so_far(body)
        allowed = name is not None and name in schemas and allows(name)
        return CallCheck(name, False, allowed, False, "cut by the budget" if cut else "not JSON")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return CallCheck(None, False, False, False, "no name")
    name, arguments = call["name"], call.get("arguments")
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return CallCheck(name, False, False, False, "arguments not JSON")
    if name not in schemas:
        return CallCheck(name, True, False, False, "no such tool")
    if not allows(name):
        return CallCheck(name, True, False, False, "not allowed now")
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schemas[name]).iter_errors(arguments)
    )
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "arguments"
        return CallCheck(name, True, True, False, f"{where}: {error.message}")
    return CallCheck(name, True, True, True, "")


def _name_so_far(body: str) -> str | None:
    """The name of a call cut short, if it got that far."""
    head = '{"name": "'
    if not body.startswith(head) or '"' not in body[len(head) :]:
        return None
    return body[len(head) :].split('"', 1)[0]


@dataclass(frozen=True)
class CostPair:
    """One prompt decoded twice, back to back: with the constraint, and without it for exactly as
    many tokens (``min_tokens`` = ``max_tokens``), so only the masking differs."""

    step: int
    tokens: int
    ms_per_token_constrained: float
    ms_per_token_unconstrained: float

    @property
    def overhead_ms(self) -> float:
        return self.ms_per_token_constrained - self.ms_per_token_unconstrained


@dataclass(frozen=True)
class ConstraintCost:
    """The constraint's cost per output token over timed pairs, with its spread: a difference
    under two standard errors of the pairs' differences is not told apart from noise."""

    pairs: list[CostPair]

    @property
    def output_tokens(self) -> int:
        return sum(p.tokens for p in self.pairs)

    def ms_per_token(self, constrained: bool) -> float:
        """Pooled over the pairs: decoding time over the tokens after each reply's first."""
        tokens = sum(p.tokens - 1 for p in self.pairs)
        per = [
            p.ms_per_token_constrained if constrained else p.ms_per_token_unconstrained for p in self.pairs
        ]
        return (
            sum(ms * (p.tokens - 1) for ms, p in zip(per, self.pairs, strict=True)) / tokens
            if tokens
            else 0.0
        )

    def overhead(self) -> tuple[float, float | None]:
        """Mean extra ms per token under the constraint, and its standard error (None: one pair)."""
        diffs = [p.overhead_ms for p in self.pairs]
        if not diffs:
            return 0.0, None
        error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        return statistics.fmean(diffs), error

    def median_overhead_ms(self) -> float:
        """The median pair's difference: what a spike on a busy machine does not move."""
        return statistics.median(p.overhead_ms for p in self.pairs) if self.pairs else 0.0

    def verdict(self) -> str:
        mean, error = self.overhead()
        if not self.pairs:
            return "not measured"
        if error is None:
            return "one pair: no spread to compare with"
        return "more than noise (over 2 standard errors)" if abs(mean) > 2 * error else "within noise"

    def to_json(self) -> dict[str, Any]:
        mean, error = self.overhead()
        return {
            "pairs": len(self.pairs),
            "output_tokens_per_side": self.output_tokens,
            "ms_per_token_constrained": round(self.ms_per_token(True), 3),
            "ms_per_token_unconstrained": round(self.ms_per_token(False), 3),
            "overhead_ms_per_token": round(mean, 3),
            "overhead_standard_error_ms": round(error, 3) if error is not None else None,
            "overhead_ms_per_token_median": round(self.median_overhead_ms(), 3),
            "verdict": self.verdict(),
            "per_pair": [
                {
                    "step": p.step,
                    "tokens": p.tokens,
                    "ms_per_token_constrained": round(p.ms_per_token_constrained, 3),
                    "ms_per_token_unconstrained": round(p.ms_per_token_unconstrained, 3),
                }
                for p in self.pairs
            ],
        }
