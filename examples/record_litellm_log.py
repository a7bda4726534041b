"""Record a request log the way LiteLLM itself writes it: its ``standard_logging_object``, one per call.

LiteLLM users log traffic with a ``CustomLogger`` callback; LiteLLM hands it
``kwargs["standard_logging_object"]`` (its *standard logging payload*), and that is what gateways
and tracing integrations built on LiteLLM store. That payload keeps the request's ``messages``
at the top level, but ``tools``, ``tool_choice`` and the other request parameters in
``model_parameters``, the server's reply in ``response``, and the session in ``trace_id``
(from ``litellm_session_id``, ``litellm_trace_id`` or ``metadata["session_id"]``); its own
``session_id`` field stays empty unless ``litellm.request_correlation_in_logs`` is switched on.
``harness/explain/formats.py`` reads it from there.

The agent is scripted (``harness.scenario``: the lessons' maintenance task, its eight tools, its
recorded tool calls and results), the replies and usage are the real server's. Two sessions
share one vLLM server, with tools and tool calls:

* ``triage-7`` (``litellm_session_id``): append-only, every turn the model's reply, the step's
  tool call and its result are added;
* ``triage-8`` (``litellm_trace_id``): the same agent, which rebuilds its tool list in another
  order from turn 4 on (a planted break at the top of the prompt).

How ``examples/litellm_log.jsonl`` was recorded (litellm 1.110.2 from PyPI in its own venv; it is
not a dependency of this project)::

    python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install litellm==1.110.2
    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=2 VLLM_CPU_KVCACHE_SPACE=1 \\
    python -m vllm.entrypoints.openai.api_server --model MODEL --port 8765 --block-size 32 \\
        --enable-prefix-caching --enable-prompt-tokens-details --dtype float32 --enforce-eager \\
        --chat-template examples/chatml_tools.jinja
    LITELLM_LOCAL_MODEL_COST_MAP=True /tmp/litellm-venv/bin/python examples/record_litellm_log.py \\
        --endpoint http://127.0.0.1:8765 --model MODEL --out examples/litellm_log.jsonl
    python -m harness.explain examples/litellm_log.jsonl --chat-template examples/chatml_tools.jinja

(MODEL: the prepared SmolLM2-135M-Instruct folder, ``python -c "from harness.model import
resolve_model; print(resolve_model(None).name_or_path)"``; ``LITELLM_LOCAL_MODEL_COST_MAP``
only spares LiteLLM a download it cannot make offline.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from importlib.metadata import version
from pathlib import Path
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

# LiteLLM's own venv lacks the project's stack: import the scenario as it is, without the
# project's switch to .venv (harness/__init__.py).
os.environ.setdefault("KVCACHE_LESSONS_NO_VENV", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.scenario import ROLE, TASK, TOOL_SCHEMAS, trace  # noqa: E402

TOOLS = [{"type": "function", "function": dict(schema)} for schema in TOOL_SCHEMAS]


class JsonlLogger(CustomLogger):
    """What a LiteLLM user writes to keep a log: the standard logging payload of every call."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.handle = path.open("w", encoding="utf-8")
        self.logged = threading.Semaphore(0)

    def log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self.handle.write(json.dumps(kwargs["standard_logging_object"], default=str) + "\n")
        self.handle.flush()
        self.logged.release()


def run_session(
    logger: JsonlLogger, endpoint: str, model: str, turns: int, reorder_from: int | None, **session: Any
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": ROLE},
        {"role": "user", "content": TASK},
    ]
    for turn, step in enumerate(trace(turns), 1):
        tools = TOOLS if reorder_from is None or turn < reorder_from else [TOOLS[1], TOOLS[0], *TOOLS[2:]]
        response = litellm.completion(
            model=f"hosted_vllm/{model}",
            api_base=endpoint.rstrip("/") + "/v1",
            api_key="EMPTY",
            messages=messages,
            tools=tools,
            tool_choice="none",  # the server runs without a tool parser; the prompt is the same
            max_tokens=16,
            temperature=0,
            **session,
        )
        # The callback runs on LiteLLM's logging thread: wait for it, so lines stay in the order sent.
        if not logger.logged.acquire(timeout=60):
            raise SystemExit("LiteLLM did not call the logger within 60 s")
        call_id = f"call_{session_name(session)}_{turn}"
        call = {"name": step.action["tool"], "arguments": json.dumps(step.action["arguments"])}
        messages.append(
            {
                "role": "assistant",
                "content": response.choices[0].message.content or "",
                "tool_calls": [{"id": call_id, "type": "function", "function": call}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": step.observation})


def session_name(session: dict[str, Any]) -> str:
    return str(session.get("litellm_session_id") or session.get("litellm_trace_id"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="a vLLM server, e.g. http://127.0.0.1:8765")
    parser.add_argument("--model", required=True, help="the model name the server serves")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL log to write (must not exist)")
    parser.add_argument("--turns", type=int, default=7)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists: choose another name")
    logger = JsonlLogger(args.out)
    litellm.callbacks = [logger]
    run_session(logger, args.endpoint, args.model, args.turns, None, litellm_session_id="triage-7")
    run_session(logger, args.endpoint, args.model, args.turns + 1, 4, litellm_trace_id="triage-8")
    logger.handle.close()
    print(f"wrote {2 * args.turns + 1} records to {args.out} (litellm {version('litellm')})")


if __name__ == "__main__":
    main()
