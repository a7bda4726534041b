"""Lesson 1 against a real OpenAI-compatible vLLM server that the test starts and stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script, validate

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
        "stable_prefix_vs_timestamp.py", "--quick", "--endpoint", server.url, "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
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
    backend = ServerBackend(server.url)
    messages = [{"role": "system", "content": "Stay brief. " * 60}, {"role": "user", "content": "Hi"}]
    backend.start_variant()
    backend.generate(messages)
    assert backend.generate(messages).cached_tokens > 0
    backend.start_variant()  # new cache_salt: the same prompt is cold again
    assert backend.generate(messages).cached_tokens == 0


def test_read_cache_off_reuses_nothing_on_the_server(server: ServerProcess) -> None:
    """Lesson 3's WRONG against a server: no HTTP switch exists, a one-off cache_salt stands in."""
    backend = ServerBackend(server.url)
    messages = [{"role": "system", "content": "Stay short. " * 60}, {"role": "user", "content": "Hi"}]
    backend.start_variant()
    backend.generate(messages)
    assert backend.generate(messages, read_cache=False).cached_tokens == 0
    assert backend.generate(messages, read_cache=False).cached_tokens == 0
    assert backend.generate(messages).cached_tokens > 0  # the variant's own cache is untouched


def test_server_refuses_a_prompt_longer_than_the_context(server: ServerProcess) -> None:
    backend = ServerBackend(server.url)
    with pytest.raises(UserError, match="the server refused the request"):
        backend.generate([{"role": "user", "content": "word " * 9000}])
