"""Several OpenAI-compatible vLLM workers at once: an async client per worker, their counters,
crashing one on purpose, and an off-the-shelf router (``vllm-router``) in front of them.

Used by lesson 4. Everything a worker reports here is its own truth: per request the prompt
token IDs it saw, the tokens it served from its prefix cache
(``usage.prompt_tokens_details.cached_tokens``) and the time to the first streamed token; per
worker the cumulative ``vllm:prefix_cache_{queries,hits}_total`` counters of its ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.api_key import NO_API_KEY, REFUSED_STATUSES, ApiKey
from harness.backend import (
    Message,
    PrefixCounters,
    Reply,
    StreamedReply,
    metric_label,
    parse_prometheus,
    streaming_chat_request,
)
from harness.errors import UserError
from harness.servers import free_port, stop_process_group


@dataclass
class Worker:
    """One engine worker. ``name`` is what a router hashes (stable across runs, unlike a port);
    ``process`` is set only when this program started the server, and only then may it stop it."""

    name: str
    url: str
    process: subprocess.Popen[bytes] | None = None


@dataclass(frozen=True)
class EndpointInfo:
    model: str
    block_size: int
    vllm_version: str
    num_gpu_blocks: int | None = None  # its KV cache, in blocks (one is vLLM's reserved null block)


class WorkerUnavailable(Exception):
    """The connection to a worker failed or broke mid-request: the request was not answered."""


def _get(url: str, timeout: float, api_key: ApiKey = NO_API_KEY) -> bytes:
    request = urllib.request.Request(url, headers=api_key.headers())
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return bytes(resp.read())


def probe_endpoint(url: str, timeout: float = 10.0, api_key: ApiKey = NO_API_KEY) -> EndpointInfo:
    """Check that ``url`` is a vLLM server with prefix caching on, and takes ``api_key``, before
    any work is done."""
    base = base_url(url)
    try:
        models = json.loads(_get(base + "/v1/models", timeout, api_key))
    except urllib.error.HTTPError as exc:
        if exc.code in REFUSED_STATUSES:
            raise api_key.refused(base, exc.code) from None
        raise UserError(f"cannot reach a vLLM server at {url}: /v1/models answered HTTP {exc.code}") from exc
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach a vLLM server at {url}: {reason}") from exc
    served = [m["id"] for m in models.get("data", [])]
    if not served:
        raise UserError(f"the server at {url} serves no model")
    try:
        metrics = _get(base + "/metrics", timeout, api_key).decode()
    except urllib.error.HTTPError as exc:
        if exc.code in REFUSED_STATUSES:
            raise api_key.refused(base, exc.code) from None
        raise UserError(f"cannot read {base}/metrics: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read {base}/metrics: {exc}") from exc
    block = metric_label(metrics, "vllm:cache_config_info", "block_size")
    if block is None:
        raise UserError(f"cannot read the block size from {base}/metrics: is it a vLLM server?")
    if metric_label(metrics, "vllm:cache_config_info", "enable_prefix_caching") == "False":
        raise UserError(f"the server at {url} runs without --enable-prefix-caching")
    try:
        version = str(json.loads(_get(base + "/version", timeout, api_key)).get("version", "unknown"))
    except (OSError, ValueError):
        version = "unknown"
    blocks = metric_label(metrics, "vllm:cache_config_info", "num_gpu_blocks")
    return EndpointInfo(served[0], int(block), version, int(blocks) if blocks and blocks.isdigit() else None)


def base_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


class AsyncWorkerClient:
    """The official ``openai`` async client pointed at one worker, plus its side doors
    (``/tokenize``, ``/metrics``, ``/health``); ``api_key`` goes with every request."""

    def __init__(
        self,
        url: str,
        model: str,
        request_timeout_s: float = 900.0,
        unavailable_statuses: tuple[int, ...] = (502, 503, 504),
        api_key: ApiKey = NO_API_KEY,
    ) -> None:
        from openai import AsyncOpenAI

        self.url = base_url(url)
        self.model = model
        # HTTP statuses that mean "the worker behind this URL is gone": a proxy's, not a
        # refusal of the request itself (vllm-router answers 500 when its worker is dead).
        self.unavailable_statuses = unavailable_statuses
        # max_retries=0: a retry is a routing decision, and the lesson makes it itself.
        self.api_key = api_key
        self.openai = AsyncOpenAI(
            base_url=self.url + "/v1", api_key=api_key.client_key, timeout=request_timeout_s, max_retries=0
        )
        self.http = httpx.AsyncClient(timeout=30.0, headers=api_key.headers())

    async def chat(
        self,
        messages: Sequence[Message],
        cache_salt: str,
        max_tokens: int = 1,
        headers: dict[str, str] | None = None,
        on_accepted: Callable[[], Awaitable[None]] | None = None,
    ) -> Reply:
        """Stream one greedy chat completion; TTFT is the arrival of the first streamed token.

        ``on_accepted`` runs once the worker has accepted the request (its response headers
        are in) and before its first token: the moment a request is "in flight".
        """
        import openai

        streamed = StreamedReply(time.perf_counter())
        try:
            stream = await self.openai.chat.completions.create(
                # return_token_ids: the prompt IDs the engine saw (first chunk) and every
                # generated ID, so the cache model records exactly what the worker computed.
                **streaming_chat_request(self.model, messages, max_tokens, cache_salt, return_token_ids=True),
                extra_headers=headers,
            )
            if on_accepted is not None:
                await on_accepted()
            async for chunk in stream:
                streamed.add(chunk)
        except (openai.APIConnectionError, httpx.TransportError) as exc:
            raise WorkerUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        except openai.APIStatusError as exc:
            if exc.status_code in REFUSED_STATUSES:
                raise self.api_key.refused(self.url, exc.status_code) from None
            if exc.status_code in self.unavailable_statuses:
                raise WorkerUnavailable(f"{self.url}: HTTP {exc.status_code}") from exc
            message = str(exc.message).strip().splitlines()[0]
            raise UserError(f"{self.url} refused the request: {message}") from exc
        if streamed.usage is None:
            raise WorkerUnavailable(f"{self.url}: the stream ended without usage (worker lost?)")
        return streamed.reply(self.url)

    async def tokenize(self, messages: Sequence[Message]) -> list[int]:
        body = {"model": self.model, "messages": list(messages), "add_generation_prompt": True}
        resp = self._checked(await self.http.post(self.url + "/tokenize", json=body))
        return [int(t) for t in resp.json()["tokens"]]

    def _checked(self, resp: httpx.Response) -> httpx.Response:
        """An error answer is one line, as in ``chat``: a refused key (vLLM leaves ``/tokenize``
        and ``/metrics`` open, a proxy in front of it may not), a worker gone, anything else."""
        if resp.status_code in REFUSED_STATUSES:
            raise self.api_key.refused(self.url, resp.status_code)
        if resp.status_code in self.unavailable_statuses:
            raise WorkerUnavailable(f"{self.url}: HTTP {resp.status_code}")
        if resp.is_error:
            raise UserError(f"{resp.request.url}: HTTP {resp.status_code}")
        return resp

    async def counters(self) -> PrefixCounters:
        resp = self._checked(await self.http.get(self.url + "/metrics"))
        totals = parse_prometheus(resp.text)
        return PrefixCounters(
            int(totals.get("vllm:prefix_cache_queries_total", 0)),
            int(totals.get("vllm:prefix_cache_hits_total", 0)),
        )

    async def settled_counters(
        self, expected: PrefixCounters | None, timeout_s: float = 3.0
    ) -> PrefixCounters:
        """The counters once they show ``expected`` (or after ``timeout_s``, whatever they show).

        The API server updates its Prometheus counters from the engine's stats batch, which can
        land a moment after the last streamed chunk; waiting briefly for the expected value
        separates that lag from a real disagreement, which is still returned as it is.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.counters()
            if expected is None or value == expected or time.monotonic() >= deadline:
                return value
            await asyncio.sleep(0.1)

    async def healthy(self) -> bool:
        try:
            resp = await self.http.get(self.url + "/health", timeout=3.0)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        await self.openai.close()
        await self.http.aclose()


def crash(process: subprocess.Popen[bytes]) -> None:
    """Kill a server this program started the way a machine failure would: SIGKILL to its whole
    process group (API server and engine core), no graceful drain of requests in flight."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


# --- vllm-router: the production router from PyPI -----------------------------------------------

VLLM_ROUTER_PIP = "vllm-router==0.1.17"


def vllm_router_command() -> str:
    # Beside this Python first: .venv/bin is not on PATH when .venv was not activated (a script
    # started as .venv/bin/python, or restarted there by harness/__init__.py).
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("vllm-router", path=search)
    if exe is None:
        raise UserError(f"the vllm-router command is not installed: pip install {VLLM_ROUTER_PIP}")
    return exe


class VllmRouter:
    """``with VllmRouter(policy, worker_urls) as url:`` runs ``vllm-router`` (a Rust load
    balancer) on a loopback port in front of the workers, waits until it answers, and stops it.

    ``--policy consistent_hash`` keys on the ``X-Session-ID`` header; ``round_robin`` rotates
    per request. Its Prometheus exporter gets its own free port, so two runs never collide.

    Workers started with ``--api-key``: vllm-router forwards each request's ``Authorization``
    header to the worker (seen with 0.1.17), so clients send their key as usual and the router
    needs none; ``api_key`` is what its readiness check sends.
    """

    def __init__(
        self,
        policy: str,
        worker_urls: Sequence[str],
        log_dir: Path | None = None,
        timeout_s: float = 60.0,
        api_key: ApiKey = NO_API_KEY,
    ) -> None:
        self.policy = policy
        self.api_key = api_key
        self.worker_urls = [base_url(u) for u in worker_urls]
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvlessons-router-"))
        self.timeout_s = timeout_s
        self.port = free_port()
        self.log_path = self.log_dir / f"vllm-router-{policy}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            vllm_router_command(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
            "--policy",
            self.policy,
            "--worker-urls",
            *self.worker_urls,
        ]

    def __enter__(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, grace_s=5.0)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(
                    f"vllm-router exited with code {self.process.returncode} while starting: "
                    f"see {self.log_path}"
                )
            try:
                if json.loads(_get(self.url + "/v1/models", 2.0, self.api_key)).get("data"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise UserError(f"vllm-router did not become ready in {self.timeout_s:.0f} s: see {self.log_path}")
