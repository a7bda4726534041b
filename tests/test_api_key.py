"""Servers that need a key, without a server: where the key comes from, what is sent, what a
refusal says, and the flags. The same against a real vLLM server started with ``--api-key``:
tests/test_server.py."""

from __future__ import annotations

import pytest
from conftest import run_script
from test_cli import assert_one_line_error

from harness.api_key import NO_API_KEY, ApiKey, api_key_from
from harness.engine import EngineOptions
from harness.errors import UserError
from harness.servers import LocalServers, ServerProcess

SECRET = "kvtest-not-a-real-key-4711"


@pytest.mark.parametrize(
    ("flag", "environ", "expected"),
    [
        (SECRET, {"VLLM_API_KEY": "v", "OPENAI_API_KEY": "o"}, ApiKey(SECRET, "--api-key")),
        (None, {"VLLM_API_KEY": "v", "OPENAI_API_KEY": "o"}, ApiKey("v", "VLLM_API_KEY")),
        (None, {"OPENAI_API_KEY": "o"}, ApiKey("o", "OPENAI_API_KEY")),
        (None, {"VLLM_API_KEY": "  ", "OPENAI_API_KEY": "o"}, ApiKey("o", "OPENAI_API_KEY")),  # unset
        (None, {"VLLM_API_KEY": "", "OPENAI_API_KEY": ""}, NO_API_KEY),
        (None, {}, NO_API_KEY),
    ],
)
def test_the_flag_then_vllm_api_key_then_openai_api_key(
    flag: str | None, environ: dict[str, str], expected: ApiKey
) -> None:
    assert api_key_from(flag, environ) == expected


def test_an_empty_flag_is_refused() -> None:
    with pytest.raises(UserError, match="--api-key is empty"):
        api_key_from("  ", {})


def test_the_key_is_sent_but_never_shown() -> None:
    key = ApiKey(SECRET, "VLLM_API_KEY")
    assert key.headers() == {"Authorization": f"Bearer {SECRET}"}
    assert key.client_key == SECRET
    assert SECRET not in repr(key) and SECRET not in str(key)
    assert NO_API_KEY.headers() == {}
    assert NO_API_KEY.client_key == "EMPTY"  # the openai client needs something; vLLM ignores it
    wrong = str(key.refused("http://10.0.0.5:8000", 401))
    assert wrong == (
        "http://10.0.0.5:8000 refused the API key from VLLM_API_KEY (401 Unauthorized): give the "
        "server's key in VLLM_API_KEY (or --api-key)"
    )
    assert SECRET not in wrong
    assert str(NO_API_KEY.refused("http://10.0.0.5:8000", 403)) == (
        "http://10.0.0.5:8000 asks for an API key (403 Forbidden) and none was given: set "
        "VLLM_API_KEY (or pass --api-key)"
    )


def test_a_server_process_hands_its_key_to_clients() -> None:
    keyed = ServerProcess("w", 1, None, None, SECRET)  # type: ignore[arg-type]
    assert keyed.credentials == ApiKey(SECRET, "the server's key")
    assert SECRET not in repr(keyed)
    assert ServerProcess("w", 1, None, None).credentials == NO_API_KEY  # type: ignore[arg-type]


def test_local_servers_get_their_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not on the command line (``ps`` shows it to everyone); and a VLLM_API_KEY of the caller's
    environment does not reach servers started without a key (they would check it)."""
    monkeypatch.setenv("VLLM_API_KEY", "the-callers-own")
    opts = EngineOptions(model="m", device="cpu")
    keyed = LocalServers(opts, api_key=SECRET)
    assert keyed.environment(0)["VLLM_API_KEY"] == SECRET
    assert "VLLM_API_KEY" not in LocalServers(opts).environment(0)
    with pytest.raises(ValueError):
        LocalServers(opts, api_key="EMPTY")


@pytest.mark.parametrize(
    "command",
    [
        ("stable_prefix_vs_timestamp.py",),
        ("session_consistency.py",),
        ("run_all_examples.py",),
        ("-m", "harness.explain"),
        ("-m", "harness.monitor"),
    ],
)
def test_help_names_the_variables_and_warns_about_ps(command: tuple[str, ...]) -> None:
    proc = run_script(*command, "--help", env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    assert "--api-key KEY" in proc.stdout
    assert "$VLLM_API_KEY, else $OPENAI_API_KEY" in proc.stdout
    assert "visible to other users of this machine (ps): prefer export VLLM_API_KEY=..." in proc.stdout


@pytest.mark.parametrize(
    ("command", "starts"),
    [
        (("stable_prefix_vs_timestamp.py", "--quick"), "error: --api-key goes with --endpoint"),
        (("session_consistency.py", "--quick"), "error: --api-key goes with --endpoints"),
        (("-m", "harness.explain", "examples/agent_trace.jsonl"), "error: --api-key goes with --endpoint"),
    ],
)
def test_a_key_without_a_server_is_one_line(command: tuple[str, ...], starts: str) -> None:
    proc = run_script(*command, "--api-key", SECRET)
    assert_one_line_error(proc, starts)
    assert SECRET not in proc.stdout + proc.stderr
