"""Record an agent's request log, with the server's responses, in the shape the explainer reads.

This is how to capture your own agent's traffic: wrap the call that sends a request, and append
one JSON line per request with the body as sent, the response as received, a session id and a
timestamp::

    response = client.chat.completions.create(**body)
    log.write(json.dumps({"session_id": sid, "timestamp": time.time(),
                          "request": body, "response": response.model_dump()}) + "\\n")

Here the agent is scripted (harness.scenario: a recorded maintenance task, its tools and tool
results), the server's replies are real. Two sessions run against one vLLM server, the way two
agents share a deployment:

* ``atlas-openai``: OpenAI Chat Completions with ``tools``; the task as content parts; each turn
  the assistant message carries the model's reply text and the step's tool call, then a ``tool``
  message with the result. Planted mistake: from turn 4 on, the agent rebuilds its tool list in
  another order (a dict filled in a different order, a set...).
* ``atlas-anthropic``: Anthropic Messages (``/v1/messages``) with ``system`` blocks, ``tools``
  with ``input_schema``, ``tool_use`` and ``tool_result`` blocks. Planted mistake: on turn 3 a
  per-request reminder with the time is put into the system blocks.

Start a server with the tools template first (prefix caching and cached-token reporting on)::

    python -m vllm.entrypoints.openai.api_server --model MODEL --port 8000 --block-size 32 \\
        --enable-prefix-caching --enable-prompt-tokens-details --chat-template examples/chatml_tools.jinja
    python examples/record_agent_log.py --endpoint http://127.0.0.1:8000 --out my_log.jsonl
    python -m harness.explain my_log.jsonl --chat-template examples/chatml_tools.jinja

The shipped ``examples/agent_tools_log.jsonl`` was recorded this way (see the README).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.api_key import ApiKey, add_api_key_arg, api_key_from  # noqa: E402
from harness.backend import http_json  # noqa: E402
from harness.errors import UserError  # noqa: E402
from harness.scenario import ROLE, RULES, TASK, TOOL_SCHEMAS, SimulatedClock, trace  # noqa: E402

SYSTEM = ROLE + "\n\nRules:\n" + "\n".join(f"{i}. {rule}" for i, rule in enumerate(RULES, 1))
MAX_TOKENS = 24  # short replies: the log is about prompts


def openai_tools(order: list[int] | None = None) -> list[dict[str, Any]]:
    schemas = [TOOL_SCHEMAS[i] for i in order] if order else TOOL_SCHEMAS
    return [{"type": "function", "function": dict(schema)} for schema in schemas]


def post(url: str, payload: dict[str, Any], api_key: ApiKey) -> dict[str, Any]:
    return dict(http_json(url, payload, timeout=600, api_key=api_key))


def record(
    out: Any, session: str, clock: SimulatedClock, body: dict[str, Any], response: dict[str, Any]
) -> None:
    line = {"session_id": session, "timestamp": clock.now.isoformat(), "request": body, "response": response}
    out.write(json.dumps(line, ensure_ascii=False) + "\n")


def openai_session(
    base: str, model: str, salt: str, turns: int, out: Any, clock: SimulatedClock, api_key: ApiKey
) -> None:
    """OpenAI Chat Completions with tools; the tool list reordered from turn 4 on."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": [{"type": "text", "text": TASK}, {"type": "text", "text": "Work in small steps."}],
        },
    ]
    for turn, step in enumerate(trace(turns), 1):
        tools = openai_tools(None if turn < 4 else [1, 0, *range(2, len(TOOL_SCHEMAS))])
        body = {
            "model": model,
            "messages": list(messages),
            "tools": tools,
            "tool_choice": "none",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        response = post(base + "/v1/chat/completions", {**body, "cache_salt": salt}, api_key)
        record(out, "atlas-openai", clock, body, response)
        reply = response["choices"][0]["message"].get("content") or ""
        call_id = f"call_{turn}"
        messages.append(
            {
                "role": "assistant",
                "content": reply,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": step.action["tool"],
                            "arguments": json.dumps(step.action["arguments"]),
                        },
                    }
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": step.observation})
        clock.advance(step.seconds)


def anthropic_session(
    base: str, model: str, salt: str, turns: int, out: Any, clock: SimulatedClock, api_key: ApiKey
) -> None:
    """Anthropic Messages with system blocks and tools; a timestamped reminder on turn 3."""
    tools = [
        {"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
        for t in TOOL_SCHEMAS
    ]
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": TASK}]}]
    for turn, step in enumerate(trace(turns), 1):
        system: list[dict[str, Any]] = [
            {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}
        ]
        if turn == 3:
            system.insert(0, {"type": "text", "text": f"Reminder ({clock.stamp()}): keep edits minimal.\n\n"})
        body = {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "system": system,
            "tools": tools,
            "tool_choice": {"type": "none"},
            "messages": list(messages),
        }
        response = post(base + "/v1/messages", {**body, "cache_salt": salt}, api_key)
        record(out, "atlas-anthropic", clock, body, response)
        text = "".join(b.get("text", "") for b in response.get("content", []) if b.get("type") == "text")
        tool_id = f"toolu_{turn}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    *([{"type": "text", "text": text}] if text else []),
                    {
                        "type": "tool_use",
                        "id": tool_id,
                        "name": step.action["tool"],
                        "input": step.action["arguments"],
                    },
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": step.observation}],
            }
        )
        clock.advance(step.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="a vLLM server started with the tools template")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL log to write (must not exist)")
    parser.add_argument("--turns", type=int, default=6, help="turns of the OpenAI session (default 6)")
    add_api_key_arg(parser, "the --endpoint server")
    args = parser.parse_args(argv)
    try:
        if args.out.exists():
            raise UserError(f"{args.out} exists: choose another name")
        if not args.out.parent.is_dir():
            raise UserError(f"folder {args.out.parent} does not exist")
        base = args.endpoint.rstrip("/").removesuffix("/v1")
        api_key = api_key_from(args.api_key)
        try:
            model = http_json(base + "/v1/models", timeout=10, api_key=api_key)["data"][0]["id"]
        except OSError as exc:
            raise UserError(f"cannot reach a vLLM server at {args.endpoint}: {exc}") from None
        # One fresh salt for the run: a cache nothing else on the server can reach, so the log
        # starts cold. It is a transport detail and not written into the logged bodies.
        salt = f"record-{secrets.token_hex(6)}"
        with args.out.open("w", encoding="utf-8") as out:
            clock = SimulatedClock()  # the log's timestamps: reproducible, in the order sent
            openai_session(base, model, salt, args.turns, out, clock, api_key)
            anthropic_session(base, model, salt, 4, out, clock, api_key)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
