"""Lesson 1 against a real OpenAI-compatible vLLM server that the test starts and stops.

The server runs with an API key (tests/conftest.py, ``vllm_server``), as shared deployments do:
the right key works from each place a user gives it (``VLLM_API_KEY``, ``OPENAI_API_KEY``,
``--api-key``); a missing or wrong one is one line naming the server and the 401, exit 2, before
anything else is sent, and the key is in no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import key_env, run_script, validate
from test_cli import assert_one_line_error

from harness.api_key import ApiKey, api_key_from
from harness.backend import ServerBackend
from harness.errors import UserError
from harness.servers import ServerProcess

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(vllm_server: ServerProcess) -> ServerProcess:
    return vllm_server


def test_lesson1_quick_against_the_server(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "l1.json"
    proc = run_script(
        "stable_prefix_vs_timestamp.py", "--quick", "--endpoint", server.url, "--json", str(out),
        env=key_env(server),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert server.api_key not in proc.stdout + proc.stderr
    assert server.api_key.encode() not in out.read_bytes()
    # Not a terminal: each request as one plain line while it runs, no control codes.
    assert "\x1b[" not in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("  wrong #", "  right #"))]
    assert [ln.split(":")[0].strip() for ln in lines] == [
        "wrong #0",
        "wrong #1",
        "wrong #2",
        "right #0",
        "right #1",
        "right #2",
    ]
    assert all(" = predicted " in ln for ln in lines)
    data = json.loads(out.read_text())
    validate("lesson", data)
    assert data["engine"]["backend"] == "vllm-server"
    assert data["engine"]["block_size"] == 32
    for variant in data["variants"]:
        for r in variant["requests"]:
            assert r["cached_tokens"] == r["predicted_cached_tokens"], (variant["name"], r)
            assert r["ttft_ms"] > 0
        # the server's own /metrics counters tell the same story as the per-request usage
        assert variant["engine_counters"]["agree_with_requests"] is True
    wrong, right = (v["summary"] for v in data["variants"])
    assert wrong["cached_tokens"] == 0
    assert right["hit_rate"] > wrong["hit_rate"] + 0.4


def test_each_variant_starts_cold_on_a_warm_server(server: ServerProcess) -> None:
    backend = ServerBackend(server.url, api_key=server.credentials)
    messages = [{"role": "system", "content": "Stay brief. " * 60}, {"role": "user", "content": "Hi"}]
    backend.start_variant()
    backend.generate(messages)
    assert backend.generate(messages).cached_tokens > 0
    backend.start_variant()  # new cache_salt: the same prompt is cold again
    assert backend.generate(messages).cached_tokens == 0


def test_read_cache_off_reuses_nothing_on_the_server(server: ServerProcess) -> None:
    """Lesson 3's WRONG against a server: no HTTP switch exists, a one-off cache_salt stands in."""
    backend = ServerBackend(server.url, api_key=server.credentials)
    messages = [{"role": "system", "content": "Stay short. " * 60}, {"role": "user", "content": "Hi"}]
    backend.start_variant()
    backend.generate(messages)
    assert backend.generate(messages, read_cache=False).cached_tokens == 0
    assert backend.generate(messages, read_cache=False).cached_tokens == 0
    assert backend.generate(messages).cached_tokens > 0  # the variant's own cache is untouched


def test_server_refuses_a_prompt_longer_than_the_context(server: ServerProcess) -> None:
    backend = ServerBackend(server.url, api_key=server.credentials)
    with pytest.raises(UserError, match="the server refused the request"):
        backend.generate([{"role": "user", "content": "word " * 9000}])


# --- the key -------------------------------------------------------------------------------------

WRONG_KEY = "kvtest-wrong-key-0815"


def test_the_key_from_openai_api_key_and_from_the_flag(server: ServerProcess) -> None:
    """The other two places a key comes from, and the order: the flag before VLLM_API_KEY
    before OPENAI_API_KEY (a wrong key later in the order is never sent)."""
    for flag, environ in (
        (None, {"OPENAI_API_KEY": server.api_key}),
        (server.api_key, {"VLLM_API_KEY": WRONG_KEY, "OPENAI_API_KEY": WRONG_KEY}),
        (None, {"VLLM_API_KEY": server.api_key, "OPENAI_API_KEY": WRONG_KEY}),
    ):
        backend = ServerBackend(server.url, api_key=api_key_from(flag, environ))
        assert backend.generate([{"role": "user", "content": "Hi"}]).prompt_tokens > 0
        backend.close()


@pytest.mark.parametrize(
    ("flags", "env", "says"),
    [
        (
            (),
            {},
            "asks for an API key (401 Unauthorized) and none was given: set VLLM_API_KEY (or pass --api-key)",
        ),
        (
            ("--api-key", WRONG_KEY),
            {},
            "refused the API key from --api-key (401 Unauthorized): give the server's key in VLLM_API_KEY "
            "(or --api-key)",
        ),
        (
            (),
            {"OPENAI_API_KEY": WRONG_KEY},
            "refused the API key from OPENAI_API_KEY (401 Unauthorized)",
        ),
    ],
)
def test_a_missing_or_wrong_key_is_one_line_before_anything_runs(
    server: ServerProcess, flags: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--endpoint", server.url, *flags, env=env)
    assert_one_line_error(proc, f"error: {server.url} {says}")
    assert WRONG_KEY not in proc.stdout + proc.stderr
    assert server.api_key not in proc.stdout + proc.stderr
    assert "wrong #" not in proc.stdout  # no request was run


def test_a_wrong_key_in_process_is_the_same_user_error(server: ServerProcess) -> None:
    with pytest.raises(UserError) as caught:
        ServerBackend(server.url, api_key=ApiKey(WRONG_KEY, "VLLM_API_KEY"))
    assert str(caught.value).startswith(f"{server.url} refused the API key from VLLM_API_KEY (401")
    assert WRONG_KEY not in str(caught.value)


def test_vllm_router_in_front_of_a_keyed_server_forwards_the_clients_key(server: ServerProcess) -> None:
    """Lesson 4's --router vllm-router on --endpoints that need a key: the router itself takes
    none and passes each request's Authorization header on to the worker."""
    import asyncio

    from harness.workers import AsyncWorkerClient, VllmRouter, probe_endpoint, vllm_router_command

    try:
        vllm_router_command()
    except UserError:
        pytest.skip("vllm-router is not installed")
    model = probe_endpoint(server.url, api_key=server.credentials).model

    async def chat(url: str, key: ApiKey) -> int:
        client = AsyncWorkerClient(url, model, api_key=key)
        try:
            reply = await client.chat([{"role": "user", "content": "Hi"}], "kvtest-router", max_tokens=1)
            return reply.prompt_tokens
        finally:
            await client.close()

    with VllmRouter("round_robin", [server.url], api_key=server.credentials) as url:
        assert asyncio.run(chat(url, server.credentials)) > 0
        with pytest.raises(UserError, match=f"^{url} refused the API key from VLLM_API_KEY \\(401"):
            asyncio.run(chat(url, ApiKey(WRONG_KEY, "VLLM_API_KEY")))


def test_recording_a_log_from_a_keyed_server(server: ServerProcess, tmp_path: Path) -> None:
    """examples/record_agent_log.py, the README's way to record a log, with the key in
    VLLM_API_KEY; without it, one line and no log file."""
    log = tmp_path / "log.jsonl"
    command = ("examples/record_agent_log.py", "--endpoint", server.url, "--out", str(log), "--turns", "2")
    refused = run_script(*command)
    assert_one_line_error(refused, f"error: {server.url} asks for an API key (401 Unauthorized)")
    assert not log.exists()
    proc = run_script(*command, env=key_env(server))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(log.read_text().splitlines()) == 2 + 4  # the OpenAI session's turns, then Anthropic's 4
    assert server.api_key.encode() not in log.read_bytes()
    assert server.api_key not in proc.stdout + proc.stderr


def test_lesson_4s_async_client_says_what_went_wrong_in_one_line(server: ServerProcess) -> None:
    """A worker that stops taking the key mid-run (restarted with another) is the same one line
    as at start-up; an error on the paths vLLM leaves open (``/tokenize`` for a model it does not
    serve) is one line naming the URL and the status, never an httpx traceback."""
    import asyncio

    from harness.workers import AsyncWorkerClient

    async def calls() -> tuple[str, str]:
        client = AsyncWorkerClient(server.url, "no-such-model", api_key=ApiKey(WRONG_KEY, "VLLM_API_KEY"))
        try:
            with pytest.raises(UserError) as chat:
                await client.chat([{"role": "user", "content": "Hi"}], "salt")
            with pytest.raises(UserError) as tokenize:
                await client.tokenize([{"role": "user", "content": "Hi"}])
        finally:
            await client.http.aclose()
            await client.openai.close()
        return str(chat.value), str(tokenize.value)

    chat, tokenize = asyncio.run(calls())
    assert chat.startswith(f"{server.url} refused the API key from VLLM_API_KEY (401 Unauthorized)"), chat
    assert WRONG_KEY not in chat
    assert tokenize == f"{server.url}/tokenize: HTTP 404", tokenize
