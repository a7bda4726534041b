"""Shared fixtures. One real vLLM engine serves the whole test session: starting one costs
30-90 s and about 3 GB on CPU, and this machine runs one engine at a time."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.backend import ChatTokenizer, OfflineBackend  # noqa: E402
from harness.engine import EngineOptions  # noqa: E402
from harness.explain.render import ChatRenderer  # noqa: E402
from harness.model import resolve_model  # noqa: E402
from harness.servers import LocalServers, ServerProcess  # noqa: E402

# ChatML plus Hermes-style tools: renders tool-less chats exactly as SmolLM2's own template does,
# so every server test (lessons, explainer, monitor) can share one server.
TOOLS_TEMPLATE = ROOT / "examples" / "chatml_tools.jinja"


@pytest.fixture(scope="session")
def model_path() -> str:
    # Fails (not skips) when the default model is missing: setup_and_test.py prepares it.
    return resolve_model(None).name_or_path


@pytest.fixture(scope="session")
def tokenizer(model_path: str) -> ChatTokenizer:
    return ChatTokenizer(model_path)


@pytest.fixture(scope="session")
def chat_renderer(model_path: str) -> Iterator[ChatRenderer]:
    """vLLM's own chat rendering of the default model (no engine: imports vLLM, ~15 s once)."""
    renderer = ChatRenderer(model_path)
    yield renderer
    renderer.close()


@pytest.fixture(scope="session")
def tools_renderer(model_path: str) -> Iterator[ChatRenderer]:
    """The same with the tools-rendering template the test server runs."""
    renderer = ChatRenderer(model_path, TOOLS_TEMPLATE)
    yield renderer
    renderer.close()


@pytest.fixture(scope="session")
def engine(model_path: str) -> Iterator[OfflineBackend]:
    backend = OfflineBackend(EngineOptions(model=model_path, block_size=32), "SmolLM2-135M-Instruct")
    yield backend
    backend.close()


def fresh_api_key() -> str:
    """A fresh key for a test server: random, so a test that finds it in an output finds a leak."""
    return f"kvtest-{secrets.token_urlsafe(18)}"


# The variables the harness reads a key from (harness.api_key): empty in a script run by a test
# unless the test sets one, so a key of the machine running the tests can neither hide a missing
# key nor be sent anywhere.
NO_KEY_ENV = {"VLLM_API_KEY": "", "OPENAI_API_KEY": ""}


def key_env(server: ServerProcess) -> dict[str, str]:
    """The environment of a script that talks to ``server``: its key in VLLM_API_KEY."""
    return os.environ | NO_KEY_ENV | {"VLLM_API_KEY": server.api_key}


@pytest.fixture(scope="session")
def vllm_server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real OpenAI-compatible vLLM server for the whole test session (block size 32).

    It runs with an API key (vLLM's ``--api-key``, given in its environment), as shared
    deployments do: every client of it sends ``vllm_server.api_key`` (``api_key=`` of an openai
    client, ``vllm_server.credentials`` for the harness's own, ``key_env`` for a script), and
    one that does not gets 401 on ``/v1``."""
    logs = tmp_path_factory.mktemp("server-logs")
    opts = EngineOptions(model=model_path, device="cpu")
    extra = ["--chat-template", str(TOOLS_TEMPLATE)]
    # A tool parser, so that a named or required tool_choice is served (vLLM refuses them without
    # one) and streams real tool-call deltas (the proxy's tests); tool-less requests and
    # tool_choice "none" are rendered and answered as before.
    extra += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    # The Responses API's previous_response_id needs vLLM's response store (off by default).
    env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    key = fresh_api_key()
    with LocalServers(opts, count=1, log_dir=logs, extra_args=extra, env=env, api_key=key) as servers:
        yield servers[0]
    assert not servers[0].alive()


SCHEMAS = ROOT / "docs" / "schemas"


def validate(schema: str, document: object) -> None:
    """``document`` against docs/schemas/<schema>.schema.json (the JSON contract users rely on)."""
    import json

    import jsonschema
    from referencing import Registry, Resource

    loaded = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    registry = Registry().with_resources(
        [(name, Resource.from_contents(doc)) for name, doc in loaded.items()]
    )
    jsonschema.Draft202012Validator(loaded[f"{schema}.schema.json"], registry=registry).validate(document)


def run_script(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's scripts the way a user would, from the repository root."""
    full_env = dict(os.environ) | NO_KEY_ENV
    full_env.update(env or {})
    full_env.setdefault("COLUMNS", "120")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )


# An agent's tools and history, shared by the explainer's tests on the renderer, the engine and a server.


def tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    schema = {"type": "object", "properties": {k: {"type": v} for k, v in properties.items()}}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


TOOLS = [
    tool("read_file", "Read a file of the repository.", path="string"),
    tool("run_tests", "Run the test suite.", target="string"),
    tool("search_code", "Search the code for a pattern.", pattern="string"),
]


def agent_turns() -> list[dict[str, Any]]:
    """An agent's history in every shape vLLM accepts: content parts, a tool call with null
    content, a tool result, a named user."""
    return [
        {"role": "system", "content": "You are a coding agent. Use the tools."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Fix the rounding bug."},
                {"type": "text", "text": "Start with money.py."},
            ],
            "name": "dana",
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "money.py"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "def round_amount(x): ..."},
    ]
