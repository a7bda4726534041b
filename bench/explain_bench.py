"""How the explainer's cost grows with the size of the log: linear, and close to tokenizing.

Builds agent logs of about 0.1M, 1M and 5M prompt tokens (sessions that grow turn by turn to
about 20k tokens, the shape of a real coding agent: a ~1,200-token system prompt with tools, then
tool calls and tool results; every tenth request stamps a new time into the system prompt, so
breaks, their message and their hint are computed too) and measures, in one run on the same
requests:

* ``tokenizer``: rendering every request once with the model's tokenizer and chat template
  (``apply_chat_template(..., tokenize=True)``), the floor any token-exact tool pays;
* ``explain``: the whole analysis (``harness.explain.explain_requests``: vLLM's own rendering,
  the block-hash lookups, divergences, message location, hints).

It prints prompt tokens per second for both and their ratio; start-up (importing vLLM, loading
the tokenizer) is not counted. Run:

    python bench/explain_bench.py [--sizes 0.1,1,5] [--json bench/explain-results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.engine import machine_summary  # noqa: E402
from harness.explain.analyze import explain_requests  # noqa: E402
from harness.explain.formats import OPENAI, ChatRequest  # noqa: E402
from harness.model import resolve_model  # noqa: E402
from harness.scenario import TASK, SimulatedClock, action_text, observation_text, system_prompt, trace  # noqa: E402

FILLER = (
    "def handler(event, context):\n    order = load_order(event['order_id'])\n"
    "    total = sum(line.price * line.quantity for line in order.lines)\n"
    "    return {'status': 200, 'total': str(round_amount(total))}\n"
)


def session(name: str, requests: int, start_line: int) -> list[ChatRequest]:
    """One agent session of ``requests`` requests, each about 250 tokens longer than the last."""
    clock = SimulatedClock()
    steps = trace(requests)
    stamp = clock.stamp()
    history: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
    out: list[ChatRequest] = []
    for i in range(requests):
        if i and i % 10 == 0:
            clock.advance(60)
            stamp = clock.stamp()  # the planted mistake: a new time at the top of the prompt
        system = {"role": "system", "content": f"Session started {stamp}.\n\n{system_prompt()}"}
        out.append(ChatRequest(start_line + i, {"messages": [system, *history]}, OPENAI, name))
        step = steps[i]
        history = [
            *history,
            {"role": "assistant", "content": action_text(step)},
            {"role": "user", "content": observation_text(step) + "\n" + FILLER * 2},
        ]
    return out


def build_log(target_tokens: float, per_session: int) -> list[ChatRequest]:
    log: list[ChatRequest] = []
    # measured with the default tokenizer: ~1,260 tokens to start, ~187 more each request
    approx_session = per_session * 1262 + 187 * per_session**2 / 2
    sessions = max(1, round(target_tokens / approx_session))
    for s in range(sessions):
        log += session(f"agent-{s}", per_session, len(log) + 1)
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="0.1,1,5", help="target prompt tokens in millions (default 0.1,1,5)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]

    from transformers import AutoTokenizer

    from harness.explain.render import ChatRenderer

    model = resolve_model(None).name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model)
    renderer = ChatRenderer(model)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        per_session = 25 if size < 0.5 else 100  # a session grows to ~20k tokens
        log = build_log(size * 1e6, per_session)
        gc.collect()
        start = time.perf_counter()
        tokens = 0
        for request in log:
            ids = tokenizer.apply_chat_template(
                request.body["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            tokens += len(ids)
        floor_s = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        explained = explain_requests(log, renderer, 32)
        explain_s = time.perf_counter() - start
        assert sum(e.prompt_tokens for e in explained) == tokens  # the same prompts, token for token
        row = {
            "requests": len(log),
            "prompt_tokens": tokens,
            "longest_prompt": max(e.prompt_tokens for e in explained),
            "breaks": sum(e.is_break for e in explained),
            "tokenizer_s": round(floor_s, 2),
            "explain_s": round(explain_s, 2),
            "tokenizer_tokens_per_s": round(tokens / floor_s),
            "explain_tokens_per_s": round(tokens / explain_s),
            "ratio": round(explain_s / floor_s, 2),
        }
        rows.append(row)
        print(
            f"{tokens / 1e6:6.2f}M tokens, {len(log):4d} requests (longest {row['longest_prompt']:,}): "
            f"tokenizer {floor_s:7.2f} s ({row['tokenizer_tokens_per_s']:,}/s), explain {explain_s:7.2f} s "
            f"({row['explain_tokens_per_s']:,}/s), ratio {row['ratio']:.2f}x",
            flush=True,
        )
    if args.json is not None:
        document = {
            "bench": "explain_bench",
            "machine": machine_summary(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "rows": rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
