"""Agent-shaped request logs of any size, for the explainer's benchmark (``explain_bench.py``).

A *team's traffic*: many coding-agent sessions running at once, their requests interleaved in the
order they were sent. Each session is an OpenAI Chat Completions conversation with a ~1,300-token
system prompt and the agent's tool list, a task, then turn after turn an assistant tool call and
its result (~250 tokens a turn), so a session of 120 requests grows to about 30k prompt tokens.
Each record is ``{"session_id", "timestamp", "request", "response"}`` (the response: the
assistant's next tool call, as a ``chat.completion`` object without usage: no number in it is
made up). Some sessions carry the classic mistakes, so the log has breaks to explain: a
timestamp in the system prompt refreshed every 20 requests, or the tool list rebuilt in another
order once.

Sessions start in waves of ``concurrent`` (one every few seconds), requests come every ~30 s of
simulated time, so at any moment about ``concurrent`` sessions are active. Everything comes from
a seeded random generator: the same arguments write the same bytes.

    python bench/agent_logs.py OUT.jsonl --sessions 100 --requests 120
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.scenario import TOOL_SCHEMAS, system_prompt  # noqa: E402

START = 1_795_000_000.0  # 2026-11-18, simulated
TURN_SECONDS = 30.0
WAVE_SECONDS = 90 * 60.0  # a wave of sessions lasts about an hour; the next starts after it
FILES = ["money.py", "invoice.py", "ledger.py", "tax.py", "api.py", "models.py", "views.py", "jobs.py"]
WORDS = [
    *("order", "total", "amount", "line", "price", "quantity", "invoice", "ledger", "account"),
    *("balance", "rate", "tax", "discount", "customer", "currency", "rounding", "report", "batch"),
    *("retry", "queue", "cache", "timeout", "handler", "request", "response"),
]


def _code(rng: random.Random, lines: int) -> str:
    """A tool result: lines of plausible Python with the session's own names and numbers."""
    out = []
    for number in range(rng.randint(1, 400), 10_000):
        a, b, c = rng.sample(WORDS, 3)
        value, tag = rng.randint(0, 9999), rng.randint(0, 99)
        out.append(f"{number:4d}     {a}_{b} = compute_{c}({a}, {value}, '{b}-{tag}')")
        if len(out) == lines:
            break
    return "\n".join(out)


def _tools(order: list[int]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": TOOL_SCHEMAS[i]} for i in order]


def session(index: int, requests: int, start: float, seed: int) -> Iterator[tuple[float, bytes]]:
    """(timestamp, JSON line) of each request of one session, in order."""
    rng = random.Random(seed * 1_000_003 + index)
    name = f"agent-{index:05d}"
    mistake = ("timestamp", "tools_reordered", None, None)[index % 4]
    base_system = system_prompt() + f"\n\nRepository: acme/service-{index:05d} (Python 3.12)."
    order = list(range(len(TOOL_SCHEMAS)))
    task = (
        f"Ticket SVC-{rng.randint(1000, 9999)}: the {rng.choice(WORDS)} {rng.choice(WORDS)} in "
        f"{rng.choice(FILES)} is wrong for {rng.choice(WORDS)}s above {rng.randint(10, 999)}. "
        "Find the cause, fix it, and make sure the tests pass."
    )
    history: list[dict[str, Any]] = [{"role": "user", "content": task}]
    now = start
    for i in range(requests):
        system = base_system
        if mistake == "timestamp":
            stamp = START + (now - START) // (20 * TURN_SECONDS) * (20 * TURN_SECONDS)
            system = f"Current time: {stamp:.0f} (Unix seconds).\n\n{base_system}"
        if mistake == "tools_reordered" and i == requests // 2:
            order = order[3:] + order[:3]  # the agent rebuilt its tool list mid-session
        tool = TOOL_SCHEMAS[rng.randrange(len(TOOL_SCHEMAS))]["name"]
        call = {
            "id": f"call_{index}_{i}",
            "type": "function",
            "function": {
                "name": tool,
                "arguments": orjson.dumps(
                    {"path": f"services/svc{index}/{rng.choice(FILES)}", "start_line": rng.randint(1, 900)}
                ).decode(),
            },
        }
        reply = {"role": "assistant", "content": None, "tool_calls": [call]}
        body = {
            "model": "agent-model",
            "messages": [{"role": "system", "content": system}, *history],
            "tools": _tools(order),
            "temperature": 0,
        }
        response = {
            "id": f"chatcmpl-{index}-{i}",
            "object": "chat.completion",
            "model": "agent-model",
            "choices": [{"index": 0, "message": reply, "finish_reason": "tool_calls"}],
        }
        record = {"session_id": name, "timestamp": round(now, 3), "request": body, "response": response}
        yield now, orjson.dumps(record) + b"\n"
        result = {"role": "tool", "tool_call_id": call["id"], "content": _code(rng, 9)}
        history = [*history, reply, result]
        now += TURN_SECONDS * rng.uniform(0.5, 1.5)


def write_log(path: Path, sessions: int, requests: int, concurrent: int = 100, seed: int = 0) -> int:
    """Write the log; returns its size in bytes."""
    streams = [
        session(
            index,
            requests,
            START + (index // concurrent) * WAVE_SECONDS + (index % concurrent) * 6.0,
            seed,
        )
        for index in range(sessions)
    ]
    size = 0
    with path.open("wb") as out:
        for _, line in heapq.merge(*streams, key=lambda item: item[0]):
            out.write(line)
            size += len(line)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--requests", type=int, default=120, help="requests per session")
    parser.add_argument("--concurrent", type=int, default=100, help="sessions active at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = write_log(args.out, args.sessions, args.requests, args.concurrent, args.seed)
    print(f"wrote {args.out}: {args.sessions} sessions x {args.requests} requests, {size / 1e6:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
