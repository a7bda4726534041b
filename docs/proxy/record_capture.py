"""Record what README "Point your agent at it" and docs/proxy.md show: the proxy's console while a
scripted agent works through it against a real vLLM server, and the log it wrote.

A local vLLM server (SmolLM2-135M-Instruct, CPU, the Hermes-style tools template), then
``python -m harness.proxy`` in front of it, then three agent sessions that talk to the proxy
through the official SDKs, the way an unmodified agent would (only the base URL points at the
proxy), each with its own ``X-Session-Id``:

* ``atlas-openai``: OpenAI Chat Completions, streamed with usage, tools, a tool call and its
  result appended every turn; planted mistake: from turn 4 on the tool list comes in another
  order (a rebuilt dict);
* ``atlas-anthropic``: Anthropic Messages, streamed, system blocks, ``tool_use`` and
  ``tool_result``; planted mistake: on turn 3 a reminder with the time goes into the system blocks;
* ``atlas-responses``: the Responses API, chained with ``previous_response_id``.

The agent is scripted (harness.scenario: a maintenance task, its tools and tool results); the
server's replies, usage and cached tokens are real. Run from the repository root, under the
engine lock::

    flock /tmp/vllm-engine.lock python docs/proxy/record_capture.py

It writes docs/proxy/console.txt (the proxy's output, its temporary paths shortened) and
docs/proxy/log.jsonl (the log), in about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import anthropic  # noqa: E402
import openai  # noqa: E402
from openai.lib.streaming.chat import ChatCompletionStreamState  # noqa: E402

from harness.engine import EngineOptions  # noqa: E402
from harness.model import resolve_model  # noqa: E402
from harness.scenario import ROLE, RULES, TASK, TOOL_SCHEMAS, SimulatedClock, trace  # noqa: E402
from harness.servers import LocalServers  # noqa: E402

OUT = Path(__file__).resolve().parent
TEMPLATE = ROOT / "examples" / "chatml_tools.jinja"
SYSTEM = ROLE + "\n\nRules:\n" + "\n".join(f"{i}. {rule}" for i, rule in enumerate(RULES, 1))
MAX_TOKENS = 24
PROVIDER = "openai:gpt-6.2-sol"


def openai_tools(reordered: bool) -> list[dict[str, Any]]:
    schemas = [TOOL_SCHEMAS[1], TOOL_SCHEMAS[0], *TOOL_SCHEMAS[2:]] if reordered else TOOL_SCHEMAS
    return [{"type": "function", "function": dict(schema)} for schema in schemas]


def openai_agent(client: openai.OpenAI, model: str, turns: int) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TASK},
    ]
    for turn, step in enumerate(trace(turns), 1):
        state = ChatCompletionStreamState()
        for chunk in client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            tools=openai_tools(reordered=turn >= 4),  # type: ignore[arg-type]
            tool_choice="none",
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            state.handle_chunk(chunk)
        reply = state.current_completion_snapshot.choices[0].message.content or ""
        call = {"name": step.action["tool"], "arguments": json.dumps(step.action["arguments"])}
        messages.append(
            {
                "role": "assistant",
                "content": reply,
                "tool_calls": [{"id": f"call_{turn}", "type": "function", "function": call}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": f"call_{turn}", "content": step.observation})


def anthropic_agent(client: anthropic.Anthropic, model: str, turns: int, clock: SimulatedClock) -> None:
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
        with client.messages.stream(
            model=model,
            max_tokens=MAX_TOKENS,
            system=system,  # type: ignore[arg-type]
            tools=tools,  # type: ignore[arg-type]
            tool_choice={"type": "none"},
            messages=messages,  # type: ignore[arg-type]
            extra_body={"temperature": 0.0},
        ) as stream:
            message = stream.get_final_message()
        text = "".join(block.text for block in message.content if block.type == "text")
        tool_use = {
            "type": "tool_use",
            "id": f"toolu_{turn}",
            "name": step.action["tool"],
            "input": step.action["arguments"],
        }
        messages.append(
            {"role": "assistant", "content": [*([{"type": "text", "text": text}] if text else []), tool_use]}
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": f"toolu_{turn}", "content": step.observation}
                ],
            }
        )
        clock.advance(step.seconds)


def responses_agent(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(
        model=model, instructions=SYSTEM, input=TASK, max_output_tokens=MAX_TOKENS, temperature=0.0
    )
    with client.responses.stream(
        model=model,
        instructions=SYSTEM,
        input="Which file do you read first?",
        previous_response_id=first.id,
        max_output_tokens=MAX_TOKENS,
        temperature=0.0,
    ) as stream:
        stream.get_final_response()


def main() -> int:
    spec = resolve_model(None)
    opts = EngineOptions(model=spec.name_or_path, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="proxy-capture-"))
    log = work / "agent.jsonl"
    extra = ["--chat-template", str(TEMPLATE)]
    env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}  # previous_response_id needs vLLM's response store
    with LocalServers(opts, count=1, log_dir=work / "server", extra_args=extra, env=env) as servers:
        upstream = servers[0].url
        command = [sys.executable, "-m", "harness.proxy", "--upstream", upstream, "--port", "8800"]
        command += [
            "--log",
            str(log),
            "--chat-template",
            "examples/chatml_tools.jinja",
            "--provider",
            PROVIDER,
        ]
        proxy = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, COLUMNS="160"),
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proxy.stdout or []), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 120
            while not any(line.startswith("analysis ready") for line in lines):
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the proxy did not start: " + "".join(lines))
                time.sleep(0.2)
            base = "http://127.0.0.1:8800"
            model = spec.name_or_path

            def oai(session: str) -> openai.OpenAI:
                headers = {"X-Session-Id": session}
                return openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", default_headers=headers)

            openai_agent(oai("atlas-openai"), model, turns=5)
            ant = anthropic.Anthropic(
                base_url=base, api_key="EMPTY", default_headers={"X-Session-Id": "atlas-anthropic"}
            )
            anthropic_agent(ant, model, 4, SimulatedClock())
            responses_agent(oai("atlas-responses"), model)
            time.sleep(3)  # the analysis runs off the request path: let it print its last lines
        finally:
            proxy.send_signal(signal.SIGINT)
            proxy.wait(300)
            reader.join(10)
    console = "".join(lines).replace(str(log), "agent.jsonl").replace(upstream, "http://127.0.0.1:8000")
    (OUT / "console.txt").write_text(console)
    shutil.copy(log, OUT / "log.jsonl")
    print(console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
